"""The kernel interface: every fast NumPy kernel, forward and backward, equals the plain
reference in `npgpt.layers` / `npgpt.optim` (float64, Hypothesis), split over 3 threads
and small blocks so tiny shapes cross every range and block edge; the whole model gives
the same logits and gradients with either set; how a backend's set is chosen."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import npgpt.kernels.numpy_fast as fast
from npgpt import layers, optim
from npgpt.kernels import threads
from npgpt.backend import NumpyBackend, get_backend
from npgpt.config import GPTConfig
from npgpt.kernels import NAMES, REFERENCE, select_kernels
from npgpt.model import GPT, segment_positions
from npgpt.optim import AdamW

from test_gradients import random_model

TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(autouse=True, scope="module")
def numpy_passes():
    """These tests prove NumPy's passes, which float32 arrays would leave for the compiled
    loops and step where numba is installed; tests/test_compiled.py and
    tests/test_compiled_step.py prove those."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast, "compiled_loops", lambda: None)
        patch.setattr(fast, "compiled_step", lambda: None)
        yield


@contextlib.contextmanager
def blocks(n_threads=3, **sizes):
    """Smaller blocks for the fast kernels (query_block=4 sets fast.QUERY_BLOCK, ...), and
    every pass split over `n_threads` threads however small, so small shapes cross block
    and thread-range edges. The pool only: the BLAS library's threads are left alone."""
    names = {name.upper(): size for name, size in sizes.items() if size is not None}
    if "ROW_BLOCK" in names:
        names.setdefault("ROW_ELEMENTS", 0)  # blocks of exactly row_block rows
        names.setdefault("INFERENCE_ROW_ELEMENTS", 0)
        names.setdefault("INFERENCE_GELU_ELEMENTS", 0)
    saved = {name: getattr(fast, name) for name in names}, threads.MIN_ELEMENTS, threads._chosen
    for name, size in names.items():
        setattr(fast, name, size)
    threads.MIN_ELEMENTS, threads._chosen = 1, n_threads
    try:
        yield
    finally:
        for name, size in saved[0].items():
            setattr(fast, name, size)
        threads.MIN_ELEMENTS, threads._chosen = saved[1:]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, **TOL)


def segments_of(rng, B, T):
    """Document ids (B, T): each row cut into 1-3 contiguous runs."""
    rows = []
    for b in range(B):
        cuts = sorted(rng.choice(np.arange(1, T), size=min(rng.integers(0, 3), T - 1), replace=False)) if T > 1 else []
        rows.append(np.repeat(np.arange(len(cuts) + 1) + 10 * b, np.diff([0, *cuts, T])))
    return np.array(rows)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 37), C=st.integers(1, 9), row_block=st.integers(1, 8), n_threads=st.integers(1, 4),
       small_gemm=st.sampled_from([0, 1 << 27]), few_rows=st.sampled_from([0, 32]), training=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
@example(N=37, C=9, row_block=5, n_threads=3, small_gemm=1 << 27, few_rows=0, training=True, seed=1)  # more rows than dw's 11 columns
@example(N=3, C=8, row_block=1, n_threads=4, small_gemm=1 << 27, few_rows=0, training=False, seed=2)  # fewer rows than threads
@example(N=37, C=9, row_block=5, n_threads=3, small_gemm=0, few_rows=0, training=False, seed=3)  # the forward's product by column ranges
@example(N=1, C=9, row_block=5, n_threads=2, small_gemm=0, few_rows=32, training=False, seed=4)  # decoding's one row: one pass per step
@example(N=31, C=9, row_block=5, n_threads=3, small_gemm=0, few_rows=32, training=False, seed=5)
@example(N=5, C=9, row_block=2, n_threads=2, small_gemm=0, few_rows=32, training=True, seed=6)  # few rows in training: the slope
def test_linear_layer_norm_and_gelu_equal_the_reference(N, C, row_block, n_threads, small_gemm, few_rows, training, seed):
    """Odd sizes, row blocks that do and do not divide N, 1-4 thread ranges (a small
    forward product split by rows, a larger one by columns, whole on 1 thread; the linear backward's threads each
    take rows of dx and a share of dw's columns); below FEW_ROWS rows (few_rows=32; 0: never),
    LayerNorm and GELU in one pass per step over all rows; forwards run as inference's or as a training piece's."""
    rng = np.random.default_rng(seed)
    x, dout = rng.standard_normal((N, C)), rng.standard_normal((N, C))
    w, b = rng.standard_normal((C, C + 2)), rng.standard_normal(C + 2)
    with blocks(row_block=row_block, n_threads=n_threads, small_gemm=small_gemm, large_column_align=1, few_rows=few_rows):
        out, cache = fast.linear_forward(x, w, b)
        ref, ref_cache = layers.linear_forward(x, w, b)
        np.testing.assert_allclose(out, ref, **TOL)
        dl = rng.standard_normal(out.shape)
        assert_same(fast.linear_backward(dl, cache), layers.linear_backward(dl, ref_cache))

        g, gb = 1.0 + 0.3 * rng.standard_normal(C), rng.standard_normal(C)
        out, cache = fast.layer_norm_forward(x, g, gb, 1e-5)
        ref, ref_cache = layers.layer_norm_forward(x, g, gb, 1e-5)
        np.testing.assert_allclose(out, ref, **TOL)
        assert_same(fast.layer_norm_backward(dout, cache), layers.layer_norm_backward(dout, ref_cache))

        x3 = 3 * x  # GELU's curved part
        with fast.as_piece("training") if training else contextlib.nullcontext():
            out, cache = fast.gelu_forward(x3)
        assert isinstance(cache, fast.Slope) == training
        ref, ref_cache = layers.gelu_forward(x3)
        np.testing.assert_allclose(out, ref, **TOL)
        np.testing.assert_allclose(fast.gelu_backward(dout, cache), layers.gelu_backward(dout, ref_cache), **TOL)


@pytest.mark.parametrize("N, n_threads, share_rows_from", [(1, 2, 32), (2, 3, 32), (3, 4, 1), (5, 2, 1), (7, 3, 4)])
def test_linear_forward_shares_rows_or_columns_among_threads(N, n_threads, share_rows_from):
    """Few rows (decoding): whole; else each thread a range of rows."""
    rng = np.random.default_rng(N)
    x, w, b = rng.standard_normal((N, 6)), rng.standard_normal((6, 11)), rng.standard_normal(11)
    with blocks(n_threads=n_threads, share_rows_from=share_rows_from, share_gemv_from=0):
        out, cache = fast.linear_forward(x, w, b)
    ref, ref_cache = layers.linear_forward(x, w, b)
    np.testing.assert_allclose(out, ref, **TOL)
    assert all(a is r for a, r in zip(cache, ref_cache, strict=True))


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 5), Cin=st.integers(1, 9), Cout=st.integers(1, 70), n_threads=st.integers(1, 4),
       share_gemv_from=st.sampled_from([0, 1 << 40]), bias=st.booleans(), transposed=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
@example(N=1, Cin=7, Cout=67, n_threads=2, share_gemv_from=0, bias=False, transposed=True, seed=0)
@example(N=2, Cin=5, Cout=33, n_threads=3, share_gemv_from=1 << 40, bias=True, transposed=False, seed=1)
def test_few_rows_product_equals_the_reference(N, Cin, Cout, n_threads, share_gemv_from, bias, transposed, seed):
    """Decoding's products (few rows): on BLAS's threads or on one; with and without bias;
    w as a transposed view (the tied LM head's wte.T)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, Cin))
    w = rng.standard_normal((Cout, Cin)).T if transposed else rng.standard_normal((Cin, Cout))
    b = rng.standard_normal(Cout) if bias else None
    with blocks(n_threads=n_threads, share_gemv_from=share_gemv_from):
        out, cache = fast.linear_forward(x, w, b)
    ref, _ = layers.linear_forward(x, w, b)
    np.testing.assert_allclose(out, ref, **TOL)
    assert cache[0] is x and cache[1] is w


def test_linear_backward_without_a_settable_blas_pool_runs_whole_products(monkeypatch):
    """Where the BLAS pool cannot be set to one thread (MKL, Accelerate), no sharing out."""
    monkeypatch.setattr(fast, "blas_settable", lambda: False)
    rng = np.random.default_rng(0)
    x, w, dout = rng.standard_normal((17, 5)), rng.standard_normal((5, 7)), rng.standard_normal((17, 7))
    with blocks(n_threads=3):
        assert_same(fast.linear_backward(dout, (x, w)), layers.linear_backward(dout, (x, w)))

attention_shapes = st.fixed_dictionaries(
    dict(
        B=st.sampled_from([1, 3]),
        NH=st.integers(1, 3),
        hs=st.integers(1, 5),
        T=st.integers(1, 13),
        past=st.integers(0, 4),  # keys held by a KV cache before the queries
        query_block=st.integers(1, 6),
        small_query_block=st.integers(1, 6),
        segments=st.booleans(),
        dropout=st.booleans(),
        threads=st.integers(1, 4),  # ranges of heads: B * NH is 1..9
        batched=st.sampled_from([0, 40, 1 << 16]),  # all heads at once when their scores fit (40: some blocks)
        head_group=st.sampled_from([1, 40, 1 << 17]),  # else heads in groups: one at a time, some, a row's
        scale=st.sampled_from([1.0, 100.0, 1e4]),  # 100: large scores, nearly one-hot probabilities; 1e4: past exp's range, shifted
        seed=st.integers(0, 2**16),
    )
)


def check_attention(B, NH, T, S, hs, rng, segments=None, dropout=False, scale=1.0):
    fused = rng.standard_normal((B, S, 3, NH, hs)).transpose(2, 0, 3, 1, 4)  # strided views, as the model's
    fused[0] *= scale
    q, k, v = fused[0, :, :, S - T :], fused[1], fused[2]
    dy = rng.standard_normal((B, T, NH, hs)).transpose(0, 2, 1, 3)
    drop = None
    if dropout:  # one mask over the whole (B, NH, T, S) matrix; blocks read their part
        full = (rng.random((B, NH, T, S)) >= 0.3) / 0.7

        def drop(probs, t0):
            mask = full[:, :, t0 : t0 + probs.shape[2], : probs.shape[3]]
            return probs * mask, mask

    y, cache = fast.attention_forward(q, k, v, drop, segments)
    ref, ref_cache = layers.attention_forward(q, k, v, drop, segments)
    # scores of size ~scale carry rounding errors ~scale * eps, which exp turns into relative
    # errors of the probabilities: the tolerance grows with the scale above 100
    tol = {name: value * max(1.0, scale / 100) for name, value in TOL.items()}
    np.testing.assert_allclose(y, ref, **tol)
    for fast_grad, ref_grad in zip(fast.attention_backward(dy, cache), layers.attention_backward(dy, ref_cache), strict=True):
        np.testing.assert_allclose(fast_grad, ref_grad, **tol)


@settings(max_examples=40, deadline=None)
@given(attention_shapes, st.sampled_from([None, 0, 40, 1 << 17]))  # not a training piece; one (some, all: one block)
@example(dict(B=1, NH=3, hs=4, T=1, past=4, query_block=2, small_query_block=2, segments=False, dropout=False,
              threads=2, batched=1 << 16, head_group=1, scale=1.0, seed=5), None)  # decoding: one query against a cache's keys
@example(dict(B=3, NH=2, hs=3, T=1, past=0, query_block=2, small_query_block=2, segments=False, dropout=False,
              threads=1, batched=0, head_group=1, scale=100.0, seed=6), None)  # one query, its own key only
@example(dict(B=3, NH=2, hs=5, T=1, past=4, query_block=2, small_query_block=2, segments=False, dropout=False,
              threads=2, batched=0, head_group=1, scale=1e4, seed=7), None)  # one query, scores past exp's range: the row maxima shift them
@example(dict(B=3, NH=3, hs=2, T=9, past=0, query_block=4, small_query_block=2, segments=True, dropout=True,
              threads=2, batched=0, head_group=40, scale=1.0, seed=8), None)  # groups of two heads (first block), cut at batch rows
@example(dict(B=3, NH=3, hs=2, T=9, past=0, query_block=4, small_query_block=2, segments=True, dropout=False,
              threads=1, batched=0, head_group=40, scale=1.0, seed=9), 1 << 17)  # a training piece: one block, all heads
@example(dict(B=3, NH=2, hs=3, T=13, past=2, query_block=4, small_query_block=2, segments=False, dropout=True,
              threads=2, batched=0, head_group=1, scale=1e4, seed=10), 1 << 17)
def test_attention_equals_the_reference(s, train_attention):
    """Across query-block edges, with a KV cache's earlier keys, segments and dropout; as a
    training piece's (train_attention: TRAIN_ATTENTION, 1 << 17 for one block of all
    heads) or not (None)."""
    rng = np.random.default_rng(s["seed"])
    B, T = s["B"], s["T"]
    past = 0 if s["segments"] else s["past"]  # segments come without a cache
    segments = segments_of(rng, B, T) if s["segments"] else None
    with blocks(query_block=s["query_block"], small_query_block=s["small_query_block"], n_threads=s["threads"],
                batched_attention=s["batched"], head_group=s["head_group"], train_attention=train_attention):  # fmt: skip
        with fast.as_piece("training") if train_attention is not None else contextlib.nullcontext():
            check_attention(B, s["NH"], T, T + past, s["hs"], rng, segments, s["dropout"], s["scale"])


@settings(max_examples=30, deadline=None)
@given(attention_shapes, st.integers(1, 37), st.integers(1, 9), st.integers(1, 8), st.sampled_from([0, 32]))
@example(dict(B=3, NH=3, hs=4, T=13, past=0, query_block=4, small_query_block=3, segments=False, dropout=False,
              threads=2, batched=1 << 16, head_group=1, scale=1.0, seed=7), 37, 9, 5, 32)  # all heads at once, blocks of 3
@example(dict(B=1, NH=3, hs=4, T=1, past=6, query_block=4, small_query_block=3, segments=False, dropout=False,
              threads=2, batched=1 << 16, head_group=1, scale=1.0, seed=8), 1, 9, 5, 32)  # a decode step: one row, one query
@example(dict(B=3, NH=2, hs=4, T=1, past=6, query_block=4, small_query_block=3, segments=False, dropout=False,
              threads=2, batched=1 << 16, head_group=1, scale=30.0, seed=9), 3, 7, 5, 32)  # three rows' steps
@example(dict(B=1, NH=2, hs=3, T=9, past=0, query_block=4, small_query_block=4, segments=False, dropout=False,
              threads=1, batched=1 << 16, head_group=1, scale=1.0, seed=8), 37, 9, 5, 32)  # one thread: GELU over x, blocks of 5
def test_an_inference_piece_keeps_no_cache_and_equals_the_reference(s, N, C, row_block, few_rows):
    """Inside `as_piece("inference")` (over_batch's pieces and decode steps): LayerNorm without
    xhat (a few rows, under FEW_ROWS: one pass per step), attention's blocks in one scratch
    per thread; outputs as the reference's (float64), caches None."""
    rng = np.random.default_rng(s["seed"])
    x = rng.standard_normal((N, C))
    g, gb = 1.0 + 0.3 * rng.standard_normal(C), rng.standard_normal(C)
    B, T, S, NH, hs = s["B"], s["T"], s["T"] + (0 if s["segments"] else s["past"]), s["NH"], s["hs"]
    q = s["scale"] * rng.standard_normal((B, NH, T, hs))
    k, v = rng.standard_normal((B, NH, S, hs)), rng.standard_normal((B, NH, S, hs))
    segments = segments_of(rng, B, T) if s["segments"] else None
    with blocks(row_block=row_block, n_threads=s["threads"], query_block=s["query_block"],
                small_query_block=s["small_query_block"], batched_attention=s["batched"],
                head_group=s["head_group"], few_rows=few_rows), fast.as_piece("inference"):  # fmt: skip
        out, cache = fast.layer_norm_forward(x, g, gb, 1e-5)
        np.testing.assert_allclose(out, layers.layer_norm_forward(x, g, gb, 1e-5)[0], **TOL)
        assert cache is None
        x3 = 3 * x  # GELU's curved part; on one thread (as eval's pieces) written over its input
        ref = layers.gelu_forward(x3)[0]
        with np.errstate(over="raise"):  # no warning escapes the kernel
            out, cache = fast.gelu_forward(x3)
        np.testing.assert_allclose(out, ref, **TOL)
        assert (out is x3 and cache is None) == (s["threads"] == 1 and N >= fast.FEW_ROWS)
        y, cache = fast.attention_forward(q, k, v, None, segments)
        np.testing.assert_allclose(y, layers.attention_forward(q, k, v, None, segments)[0], **TOL)
        assert cache is None
    assert not fast.inference()  # restored after the piece


@pytest.mark.parametrize("T, past, small_query_block, scale", [(13, 0, 4, 1.0), (13, 3, 5, 1.0), (32, 0, 32, 1.0), (2, 0, 1, 1.0),
                                                               (13, 0, 4, 1e4)])  # fmt: skip
def test_inference_attention_reads_the_models_strided_views(T, past, small_query_block, scale, monkeypatch):
    """An inference piece on one thread (eval's pieces), all heads at once: `attention_inference`
    takes the model's strided views of the fused q, k, v projection uncopied, block by block,
    and equals the reference (scale 1e4: scores past exp's range, shifted by their row maxima)."""
    calls, original = [], fast.attention_inference
    monkeypatch.setattr(fast, "attention_inference", lambda *a: calls.append(a) or original(*a))
    rng = np.random.default_rng(T + past)
    B, NH, hs, S = 3, 2, 5, T + past
    fused = rng.standard_normal((B, S, 3, NH, hs)).transpose(2, 0, 3, 1, 4)  # strided views, as the model's
    fused[0] *= scale
    q, k, v = fused[0, :, :, S - T :], fused[1], fused[2]
    with blocks(n_threads=1, small_query_block=small_query_block), threads.on_one_thread(), fast.as_piece("inference"):
        y, cache = fast.attention_forward(q, k, v)
    tol = {name: value * max(1.0, scale / 100) for name, value in TOL.items()}  # as check_attention's
    np.testing.assert_allclose(y, layers.attention_forward(q, k, v)[0], **tol)
    assert cache is None and len(calls) == 1


def test_over_batch_runs_its_pieces_as_inference_pieces():
    with blocks(n_threads=2, batch_rows=4):
        seen = fast.over_batch(lambda b0, b1: (b0, b1, fast.inference()), 5, 2)
    assert [b for b0, b1, _ in seen for b in range(b0, b1)] == list(range(5))
    assert all(flag for *_, flag in seen) and len(seen) > 1 and not fast.inference()


@pytest.mark.parametrize("training", [False, True])  # the forward keeps x, or GELU's slope
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_at_extremes_equals_the_reference(dtype, training):
    """Where exp(-2u) overflows (very negative x) and where it underflows (very positive)."""
    x = np.array([[-1e4, -100.0, -30.0, -12.0, -9.5, -5.0, 0.0, 5.0, 12.0, 30.0, 100.0, 1e4]], dtype=dtype)
    dout = np.linspace(-1.0, 1.0, x.size, dtype=dtype)[None, :]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else TOL
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # no warning escapes the kernels
        with fast.as_piece("training") if training else contextlib.nullcontext():
            out, cache = fast.gelu_forward(x)
        dx = fast.gelu_backward(dout, cache)
    assert out.dtype == dx.dtype == dtype
    np.testing.assert_allclose(out, layers.gelu_forward(x)[0], **tol)
    np.testing.assert_allclose(dx, layers.gelu_backward(dout, x), **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_over_its_input_at_extremes_equals_the_reference(dtype):
    """In an inference piece on one thread GELU is written over x, in blocks: where exp(-2u)
    overflows and underflows too."""
    x = np.tile(np.array([-1e4, -100.0, -30.0, -12.0, -9.5, -5.0, 0.0, 5.0, 12.0, 30.0, 100.0, 1e4], dtype=dtype), (fast.FEW_ROWS + 3, 1))
    ref = layers.gelu_forward(x)[0]
    with np.errstate(over="raise", divide="raise", invalid="raise"), blocks(n_threads=1, row_block=4), fast.as_piece("inference"):
        out, cache = fast.gelu_forward(x)
    assert out is x and cache is None and out.dtype == dtype
    np.testing.assert_allclose(out, ref, **(dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else TOL))


@pytest.mark.parametrize("batched", [0, None])  # 0: per head, in QUERY_BLOCKs; default: all heads, in small blocks
@pytest.mark.parametrize("T", [31, 32, 33, 127, 128, 129, 200])
def test_attention_across_the_default_query_block(T, batched):
    rng = np.random.default_rng(T)
    with blocks(batched_attention=batched):
        check_attention(3, 2, T, T, 2, rng, segments_of(rng, 3, T), dropout=True)
        check_attention(1, 1, T, T + 3, 3, rng)


@pytest.mark.parametrize("bound", [60.0, 80.0, 82.0, 200.0])
def test_attention_skips_the_row_maximum_only_where_exp_cannot_overflow(bound):
    """float32 scores up to `bound`: up to -log(tiny) - log(S) - 1 (81.5 here) the softmax
    runs unshifted, above it subtracts the row maxima; either way the probabilities and
    outputs equal the float64 reference to float32 round-off."""
    rng = np.random.default_rng(int(bound))
    B, NH, T, hs = 1, 2, 128, 8
    q, k, v = (rng.standard_normal((B, NH, T, hs)) for _ in range(3))
    q *= (bound * np.sqrt(hs)) / np.linalg.norm(q, axis=-1, keepdims=True).max(axis=-2, keepdims=True)
    q[..., 0, :] *= (bound * np.sqrt(hs)) / np.linalg.norm(q[..., 0, :], axis=-1, keepdims=True)  # the longest
    k /= np.linalg.norm(k, axis=-1, keepdims=True)  # unit keys, the first along the first query:
    k[..., 0, :] = q[..., 0, :] / (bound * np.sqrt(hs))  # its score, q . k / sqrt(hs), is the bound
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    scores = q32 @ k32.mT / np.float32(np.sqrt(hs))
    assert np.isclose(np.max(np.abs(scores)), bound, rtol=1e-4)
    assert fast.exp_is_safe(scores) == (bound < 81.0)
    y, (_, _, _, parts) = fast.attention_forward(q32, k32, v32)
    ref, (_, _, _, probs, _) = layers.attention_forward(q, k, v)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    for t0, t1, s1, att, _ in parts:
        np.testing.assert_allclose(att.reshape(B, NH, t1 - t0, s1), probs[:, :, t0:t1, :s1], rtol=1e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 20), V=st.integers(1, 11), ce_block=st.integers(1, 40), n_threads=st.integers(1, 4),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_cross_entropy_equals_the_reference(N, V, ce_block, n_threads, seed):
    rng = np.random.default_rng(seed)
    logits = 3 * rng.standard_normal((N, V))
    targets = rng.integers(0, V, N)
    targets[rng.random(N) < 0.3] = layers.IGNORE_INDEX
    ref, ref_cache = layers.cross_entropy_forward(logits.copy(), targets)
    with blocks(ce_block=ce_block, n_threads=n_threads):
        loss, cache = fast.cross_entropy_forward(logits.copy(), targets)  # overwrites its logits
        dlogits = fast.cross_entropy_backward(0.7, cache)
    np.testing.assert_allclose(loss, ref, **TOL)
    assert np.ndim(loss) == 0
    np.testing.assert_allclose(dlogits, layers.cross_entropy_backward(0.7, ref_cache), **TOL)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 20), V=st.integers(1, 11), ce_block=st.integers(1, 40), n_threads=st.integers(1, 4),
       large=st.sampled_from([0.0, 0.3, 1.0]), dtype=st.sampled_from([np.float64, np.float32]), seed=st.integers(0, 2**16))  # fmt: skip
@example(N=7, V=5, ce_block=10, n_threads=1, large=0.3, dtype=np.float64, seed=1)  # blocks of 2 rows, some shifted, some not
def test_cross_entropy_shifts_only_blocks_whose_exp_could_overflow(N, V, ce_block, n_threads, large, dtype, seed):
    """A block of logits within `exp_limit` skips the row maxima (shift 0); a block with a
    logit past it is shifted by its row maxima: loss and gradient as the reference's
    (float64) either way, blocks of both kinds mixed."""
    rng = np.random.default_rng(seed)
    logits = 3 * rng.standard_normal((N, V))
    huge = rng.random(N) < large  # rows with a logit past exp's range for this row length
    logits[huge, rng.integers(0, V)] += 2.0 * fast.exp_limit(V, dtype) * rng.choice([-1.0, 1.0])
    logits = logits.astype(dtype)
    targets = rng.integers(0, V, N)
    targets[rng.random(N) < 0.3] = layers.IGNORE_INDEX
    ref, ref_cache = layers.cross_entropy_forward(logits.astype(np.float64), targets)
    checks, original = [], fast.exp_is_safe
    with pytest.MonkeyPatch.context() as patch, blocks(ce_block=ce_block, n_threads=n_threads):
        patch.setattr(fast, "exp_is_safe", lambda a: checks.append(original(a)) or checks[-1])
        loss, cache = fast.cross_entropy_forward(logits.copy(), targets)
        dlogits = fast.cross_entropy_backward(0.7, cache)
    assert checks and all(checks) == (not huge.any())  # a block is shifted exactly where it holds a huge logit
    tol = TOL if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, ref, **tol)
    np.testing.assert_allclose(dlogits, layers.cross_entropy_backward(0.7, ref_cache), **tol)


@settings(max_examples=30, deadline=None)
@given(N=st.sampled_from([1, 3, 7, 20]), C=st.integers(1, 6), V=st.integers(1, 23), lm_tile=st.integers(1, 60),
       n_threads=st.integers(1, 4), ignored=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**16))  # fmt: skip
@example(N=3, C=5, V=23, lm_tile=7, n_threads=3, ignored=0.3, seed=0)  # blocks of 2 columns, the last of 1
def test_the_lm_head_loss_equals_the_reference(N, C, V, lm_tile, n_threads, ignored, seed):
    rng = np.random.default_rng(seed)
    x, wte = 3 * rng.standard_normal((N, C)), rng.standard_normal((V, C))
    targets = rng.integers(0, V, N)
    targets[rng.random(N) < ignored] = layers.IGNORE_INDEX
    ref, ref_cache = layers.lm_head_loss_forward(x, wte, targets)
    with blocks(lm_tile=lm_tile, vocab_align=1, n_threads=n_threads):
        loss, cache = fast.lm_head_loss_forward(x, wte, targets)
        grads = fast.lm_head_loss_backward(np.asarray(0.7), cache)
    np.testing.assert_allclose(loss, ref, **TOL)
    assert np.ndim(loss) == 0
    assert_same(grads, layers.lm_head_loss_backward(np.asarray(0.7), ref_cache))


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(1,), (7,), (3, 5), (13, 3), (2, 3, 4)]),
    flat_block=st.integers(1, 9),
    n_threads=st.integers(1, 4),
    decay=st.sampled_from([0.0, 0.1]),
    step=st.integers(1, 3),
    strided=st.booleans(),
    grad_scale=st.sampled_from([None, 0.37, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_optimizer_kernels_equal_the_reference(shape, flat_block, n_threads, decay, step, strided, grad_scale, seed):
    """AdamW's update (with and without a gradient scale) and the sum of squares, over flat
    blocks that do and do not divide the size, split over threads; a strided parameter
    takes the reference's path."""
    rng = np.random.default_rng(seed)
    p, g = rng.standard_normal(shape), rng.standard_normal(shape)
    m, v = 0.1 * rng.standard_normal(shape), rng.random(shape)
    layout = (lambda a: np.repeat(a, 2, axis=-1)[..., ::2]) if strided else np.copy  # every other element
    ours, ref = [layout(a) for a in (p, m, v)], [layout(a) for a in (p, m, v)]
    g = layout(g)
    args = (1e-2, decay, 0.9, 0.95, step, 1e-8, None if grad_scale is None else np.asarray(grad_scale))
    with blocks(flat_block=flat_block, dot_block=flat_block + 1, n_threads=n_threads):
        fast.adamw_update(ours[0], g, ours[1], ours[2], *args)
        total = fast.sum_of_squares(g)
    optim.adamw_update(ref[0], g, ref[1], ref[2], *args)
    assert_same(ours, ref)
    assert not np.allclose(ours[0], p)  # the parameter moved
    np.testing.assert_allclose(total, optim.sum_of_squares(g), **TOL)
    assert np.ndim(total) == 0 and total.dtype == g.dtype


@settings(max_examples=10, deadline=None)
@given(max_norm=st.sampled_from([0.0, 0.5, 1e3]), fast_kernels=st.booleans(), seed=st.integers(0, 2**16))
def test_clipped_step_equals_clipping_then_the_step(max_norm, fast_kernels, seed):
    """`clipped_step` (the clip factor folded into AdamW's moments, gradients left as they
    are) moves parameters and moments as clip_grad_norm (gradients scaled in place) then
    AdamW.step do, clipping (0.5) or not (1e3, and 0: off); same norm returned."""
    rng = np.random.default_rng(seed)
    shapes = {"wte.weight": (11, 4), "h.0.mlp.c_fc.weight": (4, 300), "h.0.ln_1.bias": (4,)}
    params = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
    grads = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
    backend = NumpyBackend(fast.KERNELS if fast_kernels else REFERENCE)
    ours, ref = {k: p.copy() for k, p in params.items()}, {k: p.copy() for k, p in params.items()}
    opt_ours, opt_ref = AdamW(ours, backend), AdamW(ref, backend)
    kept = {k: g.copy() for k, g in grads.items()}
    with blocks(flat_block=64, dot_block=65, n_threads=2):
        for _ in range(2):
            norm = optim.clipped_step(opt_ours, grads, max_norm, 1e-2)
            scaled = {k: g.copy() for k, g in grads.items()}
            ref_norm = optim.clip_grad_norm(scaled, max_norm, backend) if max_norm else optim.global_norm(scaled, backend)
            opt_ref.step(scaled, 1e-2)
            np.testing.assert_allclose(norm, ref_norm, **TOL)
    assert_same([grads[k] for k in shapes], [kept[k] for k in shapes])  # left unscaled
    for a, b in ((ours, ref), (opt_ours.m, opt_ref.m), (opt_ours.v, opt_ref.v)):
        assert_same([a[k] for k in shapes], [b[k] for k in shapes])
    assert not np.allclose(ours["wte.weight"], params["wte.weight"])


@settings(max_examples=25, deadline=None)
@given(B=st.sampled_from([1, 3]), T=st.integers(1, 9), start=st.integers(0, 3), packed=st.booleans(), seed=st.integers(0, 2**16),
       column_major=st.booleans())  # fmt: skip
def test_embedding_equals_the_reference(B, T, start, packed, seed, column_major):
    rng = np.random.default_rng(seed)
    wte, wpe = rng.standard_normal((5, 3)), rng.standard_normal((12, 3))
    wte = np.asfortranarray(wte) if column_major else wte  # a decoding model's layout (npgpt.generate.decoding_layout)
    ids = rng.integers(0, 5, (B, T))
    pos = segment_positions(segments_of(rng, B, T)) if packed else np.broadcast_to(np.arange(start, start + T), (B, T))
    x, cache = fast.KERNELS.embedding_forward(wte, wpe, ids, pos)
    np.testing.assert_allclose(x, layers.embedding_forward(wte, wpe, ids, pos)[0], **TOL)
    dx, backend = rng.standard_normal((B, T, 3)), get_backend("numpy")
    ours = fast.embedding_backward(dx, cache, np.ones_like(wte), wpe.shape, backend)
    assert_same(ours, layers.embedding_backward(dx, cache, np.ones_like(wte), wpe.shape, backend))


# -- the whole model, both ways --------------------------------------------------------------
model_cases = st.fixed_dictionaries(
    dict(
        B=st.sampled_from([1, 3]),
        T=st.integers(1, 11),
        segments=st.booleans(),
        dropout=st.booleans(),
        query_block=st.integers(1, 12),
        seed=st.integers(0, 2**16),
    )
)


@settings(max_examples=15, deadline=None)
@given(model_cases)
def test_the_model_gives_the_same_logits_and_gradients_with_either_set(s):
    cfg = GPTConfig(vocab_size=13, n_ctx=12, n_embd=6, n_head=2, n_layer=2, dropout=0.2 if s["dropout"] else 0.0)
    fast_model = random_model(cfg, s["seed"])
    ref_model = GPT.from_numpy(cfg, fast_model.to_numpy(), NumpyBackend(REFERENCE))
    assert fast_model.backend.kernels is fast.KERNELS and ref_model.backend.kernels is REFERENCE
    rng = np.random.default_rng(s["seed"])
    ids, targets = rng.integers(0, 13, (s["B"], s["T"])), rng.integers(0, 13, (s["B"], s["T"]))
    segments = segments_of(rng, s["B"], s["T"]) if s["segments"] else None
    # dropout draws one mask per query block: the same stream only with one block
    query_block = 128 if s["dropout"] else s["query_block"]
    with blocks(query_block=query_block, row_block=5, n_threads=2):
        np.testing.assert_allclose(fast_model.forward(ids, segments=segments), ref_model.forward(ids, segments=segments), **TOL)
        drop = (lambda: np.random.default_rng(1)) if s["dropout"] else (lambda: None)
        loss, grads = fast_model.loss_and_grads(ids, targets, rng=drop(), segments=segments)
    ref_loss, ref_grads = ref_model.loss_and_grads(ids, targets, rng=drop(), segments=segments)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    for name in grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], **TOL, err_msg=name)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), max_size=9), n_threads=st.integers(1, 4), max_norm=st.sampled_from([0.0, 0.5, 1e3]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_a_step_over_the_parameters_equals_the_reference(sizes, n_threads, max_norm, seed):
    """`over_parameters` gives fn(i) for every parameter once, in order, whatever the sizes'
    order and the threads; a clipped AdamW step (the global norm, every parameter's
    update) through it on n threads equals the reference set's, two steps running."""
    rng = np.random.default_rng(seed)
    start = {f"p{i}": rng.standard_normal((size,) if i % 2 else (size, 2)) for i, size in enumerate(sizes)}
    grads = [{name: rng.standard_normal(p.shape) for name, p in start.items()} for _ in range(2)]
    with blocks(n_threads=n_threads, parameter_elements=0):
        assert fast.over_parameters(lambda i: i, sizes) == list(range(len(sizes)))
        params = {name: p.copy() for name, p in start.items()}
        opt = AdamW(params, NumpyBackend(fast.KERNELS))
        norms = [float(optim.clipped_step(opt, g, max_norm, 1e-2)) for g in grads]
    ref_params = {name: p.copy() for name, p in start.items()}
    ref = AdamW(ref_params, NumpyBackend(REFERENCE))
    ref_norms = [float(optim.clipped_step(ref, g, max_norm, 1e-2)) for g in grads]
    np.testing.assert_allclose(norms, ref_norms, **TOL)
    for name in start:
        np.testing.assert_allclose(params[name], ref_params[name], **TOL, err_msg=name)
        np.testing.assert_allclose(opt.m[name], ref.m[name], **TOL, err_msg=name)
        assert not np.allclose(params[name], start[name])  # every parameter moved


@settings(max_examples=20, deadline=None)
@given(B=st.sampled_from([1, 3, 4]), T=st.integers(1, 7), n_threads=st.integers(1, 3), ignored=st.sampled_from(["none", "some", "row", "all"]),
       segments=st.booleans(), dropout=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
@example(B=4, T=5, n_threads=2, ignored="row", segments=True, dropout=True, seed=0)  # a piece with no scored target
def test_a_training_batch_in_pieces_equals_it_whole(B, T, n_threads, ignored, segments, dropout, seed):
    """`over_train_batch` runs one piece of rows per thread (forced here however small;
    with fewer rows than threads, the batch whole);
    the pieces' losses and gradients sum to the whole batch's, with ignored targets
    (a whole row's: a piece may score none; or all), packed rows and dropout (each row
    draws its own masks), and `grad_ready` sees every parameter once, in the same order."""
    cfg = GPTConfig(vocab_size=11, n_ctx=8, n_embd=6, n_head=2, n_layer=2, dropout=0.3 if dropout else 0.0)
    model = random_model(cfg, seed)
    rng = np.random.default_rng(seed)
    ids, targets = rng.integers(0, 11, (B, T)), rng.integers(0, 11, (B, T))
    if ignored == "some":
        targets[rng.random((B, T)) < 0.4] = layers.IGNORE_INDEX
    elif ignored != "none":
        targets[: B if ignored == "all" else B // 2 + 1] = layers.IGNORE_INDEX
    docs = segments_of(rng, B, T) if segments else None

    def step(n):
        calls = []
        with blocks(n_threads=n, query_block=128, lm_tile=8, vocab_align=2, parameter_elements=0):  # one query block: the attention
            # masks draw alike; the LM head's vocabulary in tiles of 2 columns, shared among the threads
            assert fast.over_train_batch(lambda b0, b1: (b0, b1), B, T) == (threads.row_ranges(B, n) if B >= n else [(0, B)])
            assert all(fast.over_train_batch(lambda b0, b1: fast.backward_follows(), B, T)) and not fast.backward_follows()
            loss, grads = model.loss_and_grads(ids, targets, rng=np.random.default_rng(3), segments=docs,
                                               grad_ready=lambda names, g: calls.append(list(names)))  # fmt: skip
        return loss, grads, calls

    whole, pieces = step(1), step(n_threads)
    np.testing.assert_allclose(pieces[0], whole[0], **TOL)
    assert np.ndim(pieces[0]) == 0 and (ignored != "all" or float(pieces[0]) == 0.0)
    for name in whole[1]:
        np.testing.assert_allclose(pieces[1][name], whole[1][name], **TOL, err_msg=name)
    assert pieces[2] == whole[2] and sorted(sum(whole[2], [])) == sorted(model.params)


def test_a_backward_cut_unlike_its_forward_is_an_error(monkeypatch):
    """The model runs the pieces' backwards on the forwards' activations: a schedule that
    cuts the rows differently the second time is caught, not silently mixed."""
    cfg = GPTConfig(vocab_size=11, n_ctx=8, n_embd=6, n_head=2, n_layer=1)
    model = random_model(cfg, 0)
    cuts = iter([[(0, 2), (2, 4)], [(0, 1), (1, 4)]])
    monkeypatch.setattr(model.backend, "kernels", model.backend.kernels.replace(
        "cuts", over_train_batch=lambda fn, B, T: [fn(b0, b1) for b0, b1 in next(cuts)]))  # fmt: skip
    ids = np.zeros((4, 3), dtype=np.int64)
    with pytest.raises(RuntimeError, match=r"cut the backward's rows \(0, 1\) unlike the forward's"):
        model.loss_and_grads(ids, ids)


# -- choosing a set -----------------------------------------------------------------------------
def test_backends_supply_their_set_and_the_environment_forces_the_reference(monkeypatch):
    assert get_backend("numpy").kernels is fast.KERNELS
    assert get_backend("array-api-strict").kernels is REFERENCE  # no set of its own
    monkeypatch.setenv("NPGPT_KERNELS", "reference")
    assert get_backend("numpy").kernels is REFERENCE
    monkeypatch.setenv("NPGPT_KERNELS", "fastest")
    with pytest.raises(ValueError, match="NPGPT_KERNELS must be"):
        select_kernels(fast.KERNELS)


def test_a_set_replaces_whole_operations():
    assert {name for name in NAMES if getattr(fast.KERNELS, name) is not getattr(REFERENCE, name)} >= {
        "gelu_forward", "gelu_backward", "attention_forward", "attention_backward"}  # fmt: skip
    with pytest.raises(ValueError, match="both halves of \\['gelu'\\]"):
        REFERENCE.replace("half", gelu_forward=fast.gelu_forward)
    with pytest.raises(ValueError, match="unknown kernels"):
        REFERENCE.replace("typo", gelu_fwd=fast.gelu_forward)

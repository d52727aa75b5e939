"""The compiled loops (`npgpt.kernels.compiled`, where numba is installed) equal the plain
reference in `npgpt.layers` to float32 round-off: each loop alone (Hypothesis; the reference
in float64 on the same float32 inputs), and as NumPy's fast kernels call them, split over
threads, forward and backward; the whole float32 model gives the same loss, logits and
gradients with and without them; float64 and $NPGPT_NUMBA=0 take NumPy's passes."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

numba = pytest.importorskip("numba")

import npgpt.kernels.numpy_fast as fast  # noqa: E402
from npgpt import layers  # noqa: E402
from npgpt.kernels import compiled  # noqa: E402

from test_kernels import blocks  # noqa: E402

F32_TOL = dict(rtol=2e-5, atol=2e-6)  # float32 round-off, against the float64 reference


@contextlib.contextmanager
def compiled_loops(on: bool):
    """NumPy's fast kernels with the compiled loops (on) or NumPy's passes only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast, "compiled_loops", (lambda: compiled) if on else (lambda: None))
        yield


@numba.njit
def exp_all(z, out):
    for i in range(z.size):
        out[i] = compiled.exp32(z[i])


def test_exp32_is_within_a_few_ulp_of_exp_and_exact_at_its_limits():
    z = np.linspace(-87.3, 88.0, 2_000_003).astype(np.float32)
    out = np.empty_like(z)
    exp_all(z, out)
    exact = np.exp(z.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 4e-7  # ~3 ulp; measured 1.8e-7
    edges = np.array([-np.inf, -1e4, -87.4, 88.1, 1e4, np.inf, np.nan, 0.0, -0.0], dtype=np.float32)
    out = np.empty_like(edges)
    exp_all(edges, out)
    np.testing.assert_array_equal(out[:6], [0, 0, 0, np.inf, np.inf, np.inf])
    assert np.isnan(out[6]) and out[7] == out[8] == 1.0


def rows_of(rng, shape, scale):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 9), M=st.integers(1, 70), scale=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2**16))
@example(N=1, M=12, scale=1e4, seed=0)  # exp(-2u) overflows (x very negative) and underflows (very positive)
def test_gelu_equals_the_reference(N, M, scale, seed):
    x = rows_of(np.random.default_rng(seed), (N, M), scale)
    ref = layers.gelu_forward(x.astype(np.float64))[0]
    compiled.gelu_(x)
    np.testing.assert_allclose(x, ref, **F32_TOL)


def causal_softmax_reference(a, Tb):
    """Softmax over the last axis of a (R, Tb, s1) in float64, query t seeing keys [0, s1 - Tb + t]."""
    s1 = a.shape[-1]
    future = np.arange(s1)[None, :] > (s1 - Tb + np.arange(Tb))[:, None]  # (Tb, s1)
    scores = np.where(future, -np.inf, a.astype(np.float64))
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 5), Tb=st.integers(1, 6), past=st.integers(0, 9), scale=st.sampled_from([1.0, 30.0, 1e3]),
       seed=st.integers(0, 2**16))  # fmt: skip
@example(R=2, Tb=3, past=0, scale=1e4, seed=1)  # scores far past exp's range: each row shifted by its maximum
def test_causal_softmax_equals_the_reference(R, Tb, past, scale, seed):
    a = rows_of(np.random.default_rng(seed), (R, Tb, Tb + past), scale)
    ref = causal_softmax_reference(a, Tb)
    compiled.causal_softmax_(a)
    np.testing.assert_allclose(a, ref, rtol=F32_TOL["rtol"] * max(1.0, scale / 30), atol=F32_TOL["atol"])


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 9), C=st.integers(1, 300), shift=st.sampled_from([0.0, 10.0]), scale=st.sampled_from([1e-2, 1.0, 100.0]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_layer_norm_equals_the_reference(N, C, shift, scale, seed):
    rng = np.random.default_rng(seed)
    x = rows_of(rng, (N, C), scale) + np.float32(shift * scale)  # a mean far from 0: the two-pass variance
    w, b = (1 + 0.3 * rng.standard_normal(C)).astype(np.float32), rows_of(rng, C, 1.0)
    ref = layers.layer_norm_forward(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1e-5)[0]
    out = np.empty_like(x)
    compiled.layer_norm_(x, w, b, np.float32(1e-5), out)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 if C > 1 else 1e-5)  # C = 1: x - mean is 0


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 9), M=st.integers(1, 70), scale=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2**16))
@example(N=1, M=12, scale=1e4, seed=0)
def test_gelu_and_its_slope_equal_the_reference(N, M, scale, seed):
    x = rows_of(np.random.default_rng(seed), (N, M), scale)
    x64 = x.astype(np.float64)
    out, slope = np.empty_like(x), np.empty_like(x)
    compiled.gelu_slope_(x, out, slope)
    np.testing.assert_allclose(out, layers.gelu_forward(x64)[0], **F32_TOL)
    np.testing.assert_allclose(slope, layers.gelu_backward(np.ones_like(x64), x64), rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 9), C=st.integers(2, 300), scale=st.sampled_from([1e-2, 1.0, 100.0]), seed=st.integers(0, 2**16))
def test_layer_norm_for_training_and_its_backward_equal_the_reference(N, C, scale, seed):
    rng = np.random.default_rng(seed)
    x = rows_of(rng, (N, C), scale)
    w, b = (1 + 0.3 * rng.standard_normal(C)).astype(np.float32), rows_of(rng, C, 1.0)
    dout = rows_of(rng, (N, C), 1.0)
    ref, cache = layers.layer_norm_forward(*(a.astype(np.float64) for a in (x, w, b)), 1e-5)
    ref_dx, ref_dw, ref_db = layers.layer_norm_backward(dout.astype(np.float64), cache)
    out, xhat, rstd = np.empty_like(x), np.empty_like(x), np.empty(N, np.float32)
    compiled.layer_norm_train_(x, w, b, np.float32(1e-5), out, xhat, rstd)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xhat, cache[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rstd, cache[1][:, 0], rtol=1e-4)
    dx, dw, db = np.empty_like(x), np.full(C, 0.5, np.float32), np.full(C, -0.5, np.float32)  # dw, db: added into
    compiled.layer_norm_backward_(dout, xhat, rstd, w, dx, dw, db)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-3, atol=1e-4 * float(np.max(rstd)))
    np.testing.assert_allclose(dw - 0.5, ref_dw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db + 0.5, ref_db, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 9), V=st.integers(1, 300), scale=st.sampled_from([1.0, 10.0, 1e3]), seed=st.integers(0, 2**16))
def test_exps_and_sums_equal_the_reference(N, V, scale, seed):
    """Cross-entropy's log-sum-exp: log(total) + top - z[target] is the reference's row loss."""
    rng = np.random.default_rng(seed)
    z = rows_of(rng, (N, V), scale)
    targets = rng.integers(0, V, N)
    z64 = z.astype(np.float64)
    top = z64.max(axis=-1)
    exps = np.exp(z64 - top[:, None])
    ref_loss = np.log(exps.sum(axis=-1)) + top - z64[np.arange(N), targets]
    assert np.isclose(np.mean(ref_loss), layers.cross_entropy_forward(z64, targets)[0], rtol=1e-12)
    found_top, total = np.empty(N, np.float32), np.empty(N, np.float32)
    target_logit = z[np.arange(N), targets]
    compiled.exps_and_sums_(z, found_top, total)
    np.testing.assert_array_equal(found_top, top)
    np.testing.assert_allclose(total, exps.sum(axis=-1), rtol=F32_TOL["rtol"])
    np.testing.assert_allclose(z, exps, rtol=F32_TOL["rtol"] * max(1.0, scale / 10), atol=F32_TOL["atol"])
    loss = np.log(total.astype(np.float64)) + found_top - target_logit
    np.testing.assert_allclose(loss, ref_loss, rtol=F32_TOL["rtol"] * max(1.0, scale / 10), atol=1e-5 * max(1.0, scale / 10))


# -- as NumPy's fast kernels call them ------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 40), C=st.integers(1, 9), n_threads=st.integers(1, 3), way=st.sampled_from(["inference", "training", "plain"]),
       seed=st.integers(0, 2**16))  # fmt: skip
@example(N=1, C=8, n_threads=1, way="inference", seed=0)  # a decode step's one row
@example(N=40, C=9, n_threads=3, way="training", seed=1)
def test_the_kernels_layer_norm_and_gelu_equal_the_reference(N, C, n_threads, way, seed):
    """Inside a piece of over_batch (inference: no cache), of a training batch (GELU keeps
    its slope) or neither (generate's prefill; the caches the reference's), over 1-3 thread
    ranges, forward and backward."""
    rng = np.random.default_rng(seed)
    x = rows_of(rng, (N, 4 * C), 3.0)
    w, b = (1 + 0.3 * rng.standard_normal(4 * C)).astype(np.float32), rows_of(rng, 4 * C, 1.0)
    dout = rows_of(rng, (N, 4 * C), 1.0)
    x64, w64, b64, dout64 = (a.astype(np.float64) for a in (x, w, b, dout))
    with compiled_loops(True), blocks(n_threads=n_threads), contextlib.nullcontext() if way == "plain" else fast.as_piece(way):
        ln, ln_cache = fast.layer_norm_forward(x, w, b, 1e-5)
        g, g_cache = fast.gelu_forward(x.copy())
    assert (ln_cache is None and g_cache is None) == (way == "inference")
    ref_ln, ref_ln_cache = layers.layer_norm_forward(x64, w64, b64, 1e-5)
    np.testing.assert_allclose(ln, ref_ln, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g, layers.gelu_forward(x64)[0], **F32_TOL)
    if way != "inference":
        with compiled_loops(True), blocks(n_threads=n_threads):
            dx, dw, db = fast.layer_norm_backward(dout, ln_cache)
            dg = fast.gelu_backward(dout, g_cache)
        for grad, ref in zip((dx, dw, db), layers.layer_norm_backward(dout64, ref_ln_cache), strict=True):
            np.testing.assert_allclose(grad, ref, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(dg, layers.gelu_backward(dout64, x64), rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), NH=st.integers(1, 3), T=st.integers(1, 13), past=st.integers(0, 4), n_threads=st.integers(1, 3),
       small_query_block=st.integers(1, 6), way=st.sampled_from(["inference", "training", "plain"]), seed=st.integers(0, 2**16))  # fmt: skip
@example(B=1, NH=2, T=1, past=5, n_threads=1, small_query_block=4, way="inference", seed=0)  # a decode step
def test_the_kernels_attention_equals_the_reference_forward_and_backward(B, NH, T, past, n_threads, small_query_block, way, seed):
    """The causal softmax of every query block (and decoding's one query) by the compiled
    loop; a training forward's probabilities are what its backward reads."""
    rng = np.random.default_rng(seed)
    S, hs = T + past, 4
    q, k, v = (rows_of(rng, (B, NH, n, hs), 2.0) for n in (T, S, S))
    dy = rows_of(rng, (B, NH, T, hs), 1.0)
    with compiled_loops(True), blocks(n_threads=n_threads, small_query_block=small_query_block, query_block=3):
        with contextlib.nullcontext() if way == "plain" else fast.as_piece(way):
            y, cache = fast.attention_forward(q, k, v)
        grads = None if cache is None else fast.attention_backward(dy, cache)
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    ref, ref_cache = layers.attention_forward(q64, k64, v64)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert (grads is None) == (way == "inference")
    if grads is not None:
        for grad, ref_grad in zip(grads, layers.attention_backward(dy.astype(np.float64), ref_cache), strict=True):
            np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 20), V=st.integers(1, 40), n_threads=st.integers(1, 3), scale=st.sampled_from([1.0, 1e3]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_the_kernels_cross_entropy_equals_the_reference_forward_and_backward(N, V, n_threads, scale, seed):
    rng = np.random.default_rng(seed)
    logits = rows_of(rng, (N, V), scale)
    targets = rng.integers(0, V, N)
    targets[rng.random(N) < 0.3] = layers.IGNORE_INDEX
    ref, ref_cache = layers.cross_entropy_forward(logits.astype(np.float64), targets)
    with compiled_loops(True), blocks(n_threads=n_threads):
        loss, cache = fast.cross_entropy_forward(logits.copy(), targets)
        dlogits = fast.cross_entropy_backward(0.7, cache)
    tol = max(1.0, scale / 10)
    np.testing.assert_allclose(loss, ref, rtol=F32_TOL["rtol"] * tol, atol=1e-5 * tol)
    np.testing.assert_allclose(dlogits, layers.cross_entropy_backward(0.7, ref_cache), rtol=1e-4, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(N=st.sampled_from([1, 3, 7, 20]), C=st.integers(1, 6), V=st.integers(1, 90), n_threads=st.integers(1, 3),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_the_kernels_lm_head_loss_equals_the_reference_forward_and_backward(N, C, V, n_threads, seed):
    rng = np.random.default_rng(seed)
    x, wte = rows_of(rng, (N, C), 2.0), rows_of(rng, (V, C), 2.0)
    targets = rng.integers(0, V, N)
    targets[rng.random(N) < 0.3] = layers.IGNORE_INDEX
    ref, ref_cache = layers.lm_head_loss_forward(x.astype(np.float64), wte.astype(np.float64), targets)
    with compiled_loops(True), blocks(n_threads=n_threads, lm_tile=3 * N, vocab_align=4):  # tiles of 4 columns or more
        loss, cache = fast.lm_head_loss_forward(x, wte, targets)
        grads = fast.lm_head_loss_backward(0.7, cache)
    np.testing.assert_allclose(loss, ref, rtol=1e-4, atol=1e-5)
    for grad, ref_grad in zip(grads, layers.lm_head_loss_backward(0.7, ref_cache), strict=True):
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-3, atol=1e-5)


# -- the model -------------------------------------------------------------------------------
def test_the_float32_model_gives_the_same_loss_logits_and_gradients_with_and_without_them():
    from npgpt.config import GPTConfig
    from npgpt.model import GPT
    from test_gradients import random_model

    cfg = GPTConfig(vocab_size=37, n_ctx=24, n_embd=16, n_head=2, n_layer=2)
    model = GPT.from_numpy(cfg, {name: p.astype(np.float32) for name, p in random_model(cfg, seed=3).params.items()})
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, 37, (3, 24)), rng.integers(0, 37, (3, 24))
    results = []
    for on in (False, True):
        with compiled_loops(on):
            loss = model.backend.kernels.over_batch(lambda b0, b1: float(model.loss(ids[b0:b1], targets[b0:b1])), 3, 24)
            logits = model.forward(ids)
            train_loss, grads = model.loss_and_grads(ids, targets)
        results.append((loss, logits, float(train_loss), grads))
    (loss0, logits0, train0, grads0), (loss1, logits1, train1, grads1) = results
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    np.testing.assert_allclose(logits1, logits0, rtol=1e-4, atol=1e-5)
    assert np.isclose(train1, train0, rtol=1e-5)
    for name in grads0:
        np.testing.assert_allclose(grads1[name], grads0[name], rtol=1e-3, atol=1e-5, err_msg=name)


def test_float64_and_npgpt_numba_0_take_numpys_passes(monkeypatch):
    a32, a64 = np.zeros((2, 3), np.float32), np.zeros((2, 3))
    assert fast.loops(a32) is compiled and fast.loops(a64) is None and fast.loops(a32.T) is None  # not C-contiguous
    fast.compiled_module.cache_clear()
    monkeypatch.setenv("NPGPT_NUMBA", "0")
    try:
        assert fast.compiled_loops() is None and fast.loops(a32) is None
    finally:
        fast.compiled_module.cache_clear()
    monkeypatch.delenv("NPGPT_NUMBA")
    assert fast.loops(a32) is compiled


def test_a_numba_that_cannot_load_leaves_numpys_passes_with_a_warning(monkeypatch):
    """numba installed but unusable (here: njit raises, as numba does where no folder can
    hold its cache): a warning, and NumPy's passes; numba absent: silently NumPy's."""
    import importlib.machinery
    import sys
    import types

    broken = types.ModuleType("numba")
    broken.__spec__ = importlib.machinery.ModuleSpec("numba", None)

    def njit(**options):
        raise RuntimeError("cannot cache function: no locator available")

    broken.njit = njit
    monkeypatch.setitem(sys.modules, "numba", broken)
    monkeypatch.delitem(sys.modules, "npgpt.kernels.compiled")
    monkeypatch.delattr(sys.modules["npgpt.kernels"], "compiled")  # so that the import runs it again
    fast.compiled_module.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiled loops cannot load .*no locator available"):
            assert fast.compiled_loops() is None
        fast.compiled_module.cache_clear()
        monkeypatch.setattr(fast.importlib.util, "find_spec", lambda name: None)  # numba not installed
        with warnings_as_errors():
            assert fast.compiled_loops() is None
    finally:
        fast.compiled_module.cache_clear()
        monkeypatch.undo()
    assert fast.compiled_loops() is compiled


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield

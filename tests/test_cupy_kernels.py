"""CuPy's fused kernel set (backends/cupy/npgpt_cupy/kernels.py) equals the reference
(`npgpt.layers`), forward and backward, in float32 and float64.

Each test runs twice: on the CuPy double (tests/fake_cupy.py runs the kernels' CUDA C on
NumPy) and, marked `gpu`, on a real GPU, where CuPy compiles the same sources with NVRTC
(skipped without one).
"""

from __future__ import annotations

import fake_cupy
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt import layers
from npgpt.backend import get_backend
from npgpt_cupy import kernels

WHERE = [pytest.param("double", id="double"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]
DTYPES = st.sampled_from(["float32", "float64"])
TOLERANCE = {"float32": dict(rtol=2e-5, atol=2e-6), "float64": dict(rtol=1e-12, atol=1e-13)}


def device(where: str):
    return fake_cupy.make_backend() if where == "double" else get_backend("cupy")


def close(backend, got, expected, dtype):
    """Device results equal the NumPy reference's to round-off (tuples element by element)."""
    if isinstance(expected, tuple):
        for g, e in zip(got, expected, strict=True):
            close(backend, g, e, dtype)
        return
    host = backend.to_numpy(got)
    assert host.dtype == np.dtype(dtype)
    np.testing.assert_allclose(host, expected, **TOLERANCE[dtype])


def draws(seed: int, dtype: str, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(dtype) for shape in shapes]


@pytest.mark.parametrize("where", WHERE)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 12), dtype=DTYPES, seed=st.integers(0, 2**32 - 1))
def test_gelu_and_layer_norm(where, n, c, dtype, seed):
    b = device(where)
    x, w, bias, dout = draws(seed, dtype, (n, c), (c,), (c,), (n, c))
    x *= 3  # reach GELU's tails
    out, cache = kernels.gelu_forward(b.asarray(x))
    expected, expected_cache = layers.gelu_forward(x)
    close(b, out, expected, dtype)
    close(b, kernels.gelu_backward(b.asarray(dout), cache), layers.gelu_backward(dout, expected_cache), dtype)
    out, cache = kernels.layer_norm_forward(*map(b.asarray, (x, w, bias)), 1e-5)
    expected, expected_cache = layers.layer_norm_forward(x, w, bias, 1e-5)
    close(b, out, expected, dtype)
    close(b, kernels.layer_norm_backward(b.asarray(dout), cache), layers.layer_norm_backward(dout, expected_cache), dtype)


@pytest.mark.parametrize("where", WHERE)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 9), v=st.integers(2, 40), dtype=DTYPES, seed=st.integers(0, 2**32 - 1), dloss=st.floats(0.1, 3))
def test_cross_entropy_with_ignored_rows(where, n, v, dtype, seed, dloss):
    b = device(where)
    (logits,) = draws(seed, dtype, (n, v))
    logits *= 4
    targets = np.random.default_rng(seed).integers(-1, v, n)
    targets[targets < 0] = layers.IGNORE_INDEX  # some rows ignored, maybe all
    loss, cache = kernels.cross_entropy_forward(b.asarray(logits), b.asarray(targets))
    expected, expected_cache = layers.cross_entropy_forward(logits.copy(), targets)
    close(b, loss, np.asarray(expected), dtype)
    close(b, kernels.cross_entropy_backward(dloss, cache), layers.cross_entropy_backward(dloss, expected_cache), dtype)


@pytest.mark.parametrize("where", WHERE)
@settings(max_examples=15, deadline=None)
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 7)), p=st.sampled_from([0.0, 0.1, 0.5]), dtype=DTYPES, seed=st.integers(0, 2**32 - 1))
def test_dropout(where, shape, p, dtype, seed):
    b = device(where)
    x, dout = draws(seed, dtype, shape, shape)
    uniform = np.random.default_rng(seed).random(shape).astype(dtype)
    out, mask = kernels.dropout_forward(b.asarray(x), p, b.asarray(uniform))
    expected, expected_mask = layers.dropout_forward(x, p, uniform)
    close(b, out, expected, dtype)
    assert (mask is None) == (expected_mask is None) == (p == 0.0)
    if mask is not None:
        close(b, (mask, layers.dropout_backward(b.asarray(dout), mask)), (expected_mask, dout * expected_mask), dtype)


@pytest.mark.parametrize("where", WHERE)
@settings(max_examples=15, deadline=None)
@given(
    bnh=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    ts=st.integers(1, 7).flatmap(lambda t: st.tuples(st.just(t), st.integers(t, 9))),
    segmented=st.booleans(),
    dtype=DTYPES,
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_causal_cached_and_segmented(where, bnh, ts, segmented, dtype, seed):
    """Queries are the last T of S positions (a KV cache holds the first S - T); with
    segments (then S == T) a query sees only its own document's keys."""
    b = device(where)
    (B, NH), (T, S) = bnh, ts
    S = T if segmented else S
    q, k, v, dy = draws(seed, dtype, (B, NH, T, 4), (B, NH, S, 4), (B, NH, S, 4), (B, NH, T, 4))
    segments = np.sort(np.random.default_rng(seed).integers(0, 3, (B, T)), axis=1) if segmented else None
    y, cache = kernels.attention_forward(*map(b.asarray, (q, k, v)), segments=None if segments is None else b.asarray(segments))
    expected, expected_cache = layers.attention_forward(q, k, v, segments=segments)
    close(b, y, expected, dtype)
    close(b, kernels.attention_backward(b.asarray(dy), cache), layers.attention_backward(dy, expected_cache), dtype)


@pytest.mark.parametrize("where", WHERE)
def test_float16_takes_the_reference_path(where):
    b = device(where)
    x = np.linspace(-3, 3, 12, dtype=np.float16).reshape(3, 4)
    out, _ = kernels.gelu_forward(b.asarray(x, dtype=b.dtype("float16")))
    np.testing.assert_allclose(b.to_numpy(out), layers.gelu_forward(x)[0], rtol=1e-3, atol=1e-3)


def test_the_backend_supplies_the_fused_set():
    assert fake_cupy.make_backend().kernels is kernels.KERNELS


def test_kernel_sources_compile_as_cxx_for_float_and_double(tmp_path):
    """Without a GPU, the C++ compiler here checks each kernel's code the way CuPy wraps it:
    inputs `const T`, outputs `T&`, the reduction's map, reduce and post-map expressions
    over `a` and `b`, `_in_ind.size()`; instantiated for float and double, with float
    arithmetic never promoted to double (-Wdouble-promotion)."""
    import shutil
    import subprocess

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler here to check the kernel sources (a GPU run compiles them with NVRTC)")
    lines = ["#include <cmath>", "using std::exp; using std::log; using std::sqrt; using std::tanh;",
             "struct Index { long size() const { return 1; } };", "const Index _in_ind{}, _out_ind{};"]  # fmt: skip
    for name, (ins, outs, operation) in kernels.ELEMENTWISE.items():
        params = [f"const {p.strip()}" for p in ins.split(",")] + [f"{p.split()[0]} &{p.split()[1]}" for p in outs.split(",")]
        lines.append(f"template <typename T> void {name}({', '.join(params)}) {{ {operation}; }}")
        lines += [f"template void {name}<{t}>({', '.join(p.replace('T ', t + ' ', 1) for p in params)});" for t in ("float", "double")]
    for name, (ins, outs, map_expr, reduce_expr, post_map_expr, identity) in kernels.REDUCTION.items():
        params = [f"const {p.strip()}" for p in ins.split(",")] + [f"{p.split()[0]} &{p.split()[1]}" for p in outs.split(",")]
        body = f"T a = {identity}; T b = ({map_expr}); a = ({reduce_expr}); ({post_map_expr});"
        lines.append(f"template <typename T> void {name}({', '.join(params)}) {{ {body} }}")
        lines += [f"template void {name}<{t}>({', '.join(p.replace('T ', t + ' ', 1) for p in params)});" for t in ("float", "double")]
    source = tmp_path / "kernels.cpp"
    source.write_text("\n".join(lines) + "\n")
    result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wdouble-promotion", "-Werror", source], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

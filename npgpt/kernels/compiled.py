"""Compiled inner loops for NumPy's fast kernels, where numba is installed (`npgpt[numba]`).

NumPy's float32 `exp` runs at scalar speed on AVX2 CPUs (~1.7-2.3 ns per element on the
AMD EPYC these were measured on) and every elementwise chain costs a pass over memory per
step. These loops make one pass per row, with an `exp` the compiler vectorises (`exp32`),
for the float32 work whose time is exponentials and passes: GELU (and a training
forward's slope), the causal softmax, the row maxima, exps and sums of cross-entropy and
of the LM head's tiles, and LayerNorm forward and backward. `npgpt.kernels.numpy_fast`
calls them through `loops()`, for C-contiguous float32 arrays only; float64 (the tests'
oracle precision) always takes NumPy's passes. Each loop computes its `npgpt.layers`
formula to float32 round-off (tests/test_compiled.py proves it with Hypothesis).

They run on the calling thread and release the GIL (`nogil`), so the kernels' thread pool
shares them out as it does NumPy's passes. The machine code is cached beside this file
(`cache=True`, else in numba's cache folder): the first run compiles for a few seconds,
later ones load it.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Elementwise maths: no reassociation, so exp32's range reduction is computed as written.
ELEMENTWISE = {"fastmath": {"nsz", "arcp", "contract", "afn"}, "error_model": "numpy", "nogil": True, "cache": True}
# Loops with sums and maxima: reassociation lets the compiler vectorise them (NaN and inf
# still propagate: no "nnan"/"ninf" flags).
REDUCING = dict(ELEMENTWISE, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})

F32 = np.float32
LOG2E = F32(1 / math.log(2))
LN2_HI = F32(0.693145751953125)  # ln 2 in two parts (Cody-Waite): n * LN2_HI is exact for |n| < 2^8
LN2_LO = F32(math.log(2) - 0.693145751953125)
EXP_LOW = F32(-87.33)  # below: e^z is subnormal in float32; exp32 gives 0
EXP_HIGH = F32(88.0)  # above: exp32 gives inf (float32's largest finite e^z is at 88.72)
GELU_MINUS_2U = F32(-2 * math.sqrt(2 / math.pi))  # -2u = GELU_MINUS_2U (x + 0.044715 x^3)
GELU_CUBIC = F32(-2 * math.sqrt(2 / math.pi) * 0.044715)
GELU_TWICE_SLOPE = F32(2 * math.sqrt(2 / math.pi))  # 2 du/dx = GELU_TWICE_SLOPE + GELU_TWICE_SLOPE_CUBIC x^2
GELU_TWICE_SLOPE_CUBIC = F32(2 * math.sqrt(2 / math.pi) * 3 * 0.044715)


@numba.njit(**ELEMENTWISE)
def exp32(z):
    """e^z of a float32, to ~3 ulp (1.8e-7 relative at most, tests/test_compiled.py): z =
    n ln2 + r with |r| <= ln2 / 2, e^z = 2^n e^r, e^r by its Taylor series to r^6 (error <
    r^7 / 7! ~ 1.2e-7), 2^n written into the exponent bits. 0 below EXP_LOW (no subnormals),
    inf above EXP_HIGH, NaN for NaN."""
    zc = min(max(z, EXP_LOW), EXP_HIGH)
    n = np.floor(zc * LOG2E + F32(0.5))
    r = (zc - n * LN2_HI) - n * LN2_LO
    p = F32(1 / 720)
    p = p * r + F32(1 / 120)
    p = p * r + F32(1 / 24)
    p = p * r + F32(1 / 6)
    p = p * r + F32(0.5)
    p = p * r + F32(1.0)
    p = p * r + F32(1.0)
    scale = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)  # 2^n
    e = p * scale
    e = F32(0.0) if z < EXP_LOW else e
    e = F32(np.inf) if z > EXP_HIGH else e
    return z if z != z else e


@numba.njit(**ELEMENTWISE)
def gelu_(x):
    """GELU of x (any shape, C-contiguous float32) in place, as numpy_fast.gelu_block
    writes it: 0.5 x (1 + tanh u) = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3)."""
    flat = x.reshape(-1)
    for i in range(flat.size):
        v = flat[i]
        flat[i] = v / (F32(1.0) + exp32(v * (GELU_MINUS_2U + GELU_CUBIC * v * v)))


@numba.njit(**REDUCING)
def shifted_exps_(row, n):
    """(top, total) of row[:n]: top its maximum, row[:n] overwritten with exp(row - top),
    total their sum."""
    top = row[0]
    for s in range(1, n):
        top = max(top, row[s])
    total = F32(0.0)
    for s in range(n):
        e = exp32(row[s] - top)
        row[s] = e
        total += e
    return top, total


@numba.njit(**REDUCING)
def causal_softmax_(a):
    """Softmax in place over the last axis of scores a (R, Tb, s1) (C-contiguous float32),
    causally masked: query t of a block sees keys [0, s1 - Tb + t], the last Tb keys being
    the block's own (its row's later keys become 0). Each row shifted by its maximum."""
    R, Tb, s1 = a.shape
    for i in range(R):
        for t in range(Tb):
            row = a[i, t]
            seen = s1 - Tb + t + 1
            total = shifted_exps_(row, seen)[1]
            scale = F32(1.0) / total
            for s in range(seen):
                row[s] *= scale
            for s in range(seen, s1):
                row[s] = F32(0.0)


@numba.njit(**REDUCING)
def mean_and_rstd(row, eps):
    """(mean, 1 / sqrt(var + eps)) of one row, the variance that of row - mean (two passes,
    as the reference), in float32."""
    C = row.shape[0]
    mean = F32(0.0)
    for c in range(C):
        mean += row[c]
    mean /= F32(C)
    var = F32(0.0)
    for c in range(C):
        d = row[c] - mean
        var += d * d
    return mean, F32(1.0) / np.sqrt(var / F32(C) + eps)


@numba.njit(**REDUCING)
def layer_norm_(x, w, b, eps, out):
    """out (N, C) = (x - mean) / sqrt(var + eps) * w + b by rows of x (N, C)."""
    N, C = x.shape
    for i in range(N):
        row, o = x[i], out[i]
        mean, rstd = mean_and_rstd(row, eps)
        for c in range(C):
            o[c] = (row[c] - mean) * rstd * w[c] + b[c]


@numba.njit(**REDUCING)
def exps_and_sums_(z, top, total):
    """Per row of logits z (N, V): top = max z, z overwritten with exp(z - top) (the
    unnormalised probabilities), total = their sum: cross-entropy's and the LM head
    tiles' log-sum-exp without a pass per step."""
    for i in range(z.shape[0]):
        top[i], total[i] = shifted_exps_(z[i], z.shape[1])


@numba.njit(**ELEMENTWISE)
def gelu_slope_(x, out, slope):
    """GELU of x (N, M) into `out` and its derivative into `slope`, as numpy_fast.gelu_slope_block:
    with s = sigmoid(2u) = 1 / (1 + e^(-2u)), GELU = x s and d/dx = s + 2 x s (1 - s) du/dx."""
    N, M = x.shape
    for i in range(N):
        xr, o, sl = x[i], out[i], slope[i]
        for j in range(M):
            v = xr[j]
            v2 = v * v
            s = F32(1.0) / (F32(1.0) + exp32(v * (GELU_MINUS_2U + GELU_CUBIC * v2)))
            g = v * s
            o[j] = g
            sl[j] = s + g * (F32(1.0) - s) * (GELU_TWICE_SLOPE + GELU_TWICE_SLOPE_CUBIC * v2)


@numba.njit(**REDUCING)
def layer_norm_train_(x, w, b, eps, out, xhat, rstd):
    """`layer_norm_` keeping what the backward reads: xhat (N, C), the normalised rows,
    and rstd (N,), 1 / sqrt(var + eps)."""
    N, C = x.shape
    for i in range(N):
        row, xh, o = x[i], xhat[i], out[i]
        mean, r = mean_and_rstd(row, eps)
        rstd[i] = r
        for c in range(C):
            n = (row[c] - mean) * r
            xh[c] = n
            o[c] = n * w[c] + b[c]


@numba.njit(**REDUCING)
def layer_norm_backward_(dout, xhat, rstd, w, dx, dw, db):
    """LayerNorm's backward by rows: dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dout w,
    and dout xhat, dout added into dw, db (C,) (the caller sums its ranges')."""
    N, C = dout.shape
    for i in range(N):
        d, xh, g = dout[i], xhat[i], dx[i]
        mean_g = F32(0.0)
        mean_gx = F32(0.0)
        for c in range(C):
            gc = d[c] * w[c]
            g[c] = gc
            mean_g += gc
            mean_gx += gc * xh[c]
            dw[c] += d[c] * xh[c]
            db[c] += d[c]
        mean_g /= F32(C)
        mean_gx /= F32(C)
        r = rstd[i]
        for c in range(C):
            g[c] = (g[c] - mean_g - xh[c] * mean_gx) * r

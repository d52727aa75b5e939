"""CuPy's kernel set (`npgpt.kernels`): GELU, LayerNorm, cross-entropy and dropout as fused
CUDA kernels (`cupy.ElementwiseKernel` / `cupy.ReductionKernel`), each one launch where the
reference formula makes several passes over memory, each equal to the `npgpt.layers`
formula (tests/test_cupy_backend.py, on the CuPy double; tests/test_cupy_gpu.py on a GPU).

    GELU          forward 1 kernel (reference: ~8 passes); backward 1 (~15)
    attention     masked softmax 3 passes + 1 kernel over the whole (B, NH, T, S) scores
                  (reference: ~7); its backward 2 (~5); the matmuls are cuBLAS's
    LayerNorm     forward 2 reductions + 1 kernel (~8); backward 2 reductions, 1 kernel,
                  2 column sums (~12)
    cross-entropy forward 2 reductions and a gather, keeping the logits instead of an
                  (N, V) probability matrix; backward 1 kernel writing dlogits, then the
                  N target entries (distinct positions: no atomics)
    dropout       forward 1 kernel writing the output and the mask together

Kernels are written for float32 and float64 (computing in T); float16 arrays take the
reference path, whose CuPy operations compute in float internally. The kernel code keeps
to a small subset of CUDA C that tests/fake_cupy.py can also run. Linear and embedding
stay the reference's (cuBLAS matmuls; the embedding's deterministic index_add).
"""

from __future__ import annotations

import functools
import math
import types

from npgpt import layers
from npgpt.kernels import REFERENCE
from npgpt.namespaces import array_namespace as namespace

# Constants typed T, so float32 kernels compute in float32 (a bare 0.5 is a double in C)
GELU_CONSTANTS = f"const T k = {math.sqrt(2.0 / math.pi)!r}; const T c = 0.044715; const T h = 0.5;"

# (in_params, out_params, operation) of each ElementwiseKernel
ELEMENTWISE = {
    "gelu": ("T x", "T y", f"{GELU_CONSTANTS} const T u = k * (x + c * x * x * x); y = h * x * (1 + tanh(u))"),
    "gelu_grad": (
        "T dout, T x",
        "T dx",
        f"{GELU_CONSTANTS} const T x2 = x * x; const T t = tanh(k * x * (1 + c * x2)); "
        "dx = dout * (h * (1 + t) + h * x * (1 - t * t) * k * (1 + 3 * c * x2))",
    ),
    "layer_norm": ("T x, T mean, T rstd, T w, T b", "T xhat, T y", "xhat = (x - mean) * rstd; y = xhat * w + b"),
    "layer_norm_grad": ("T dout, T w, T xhat, T rstd, T mean_g, T mean_gx", "T dx", "dx = rstd * (dout * w - mean_g - xhat * mean_gx)"),
    "softmax_scaled": ("T x, T row_max, T log_sum, T scale", "T y", "y = exp(x - row_max - log_sum) * scale"),
    "softmax_grad": ("T p, T dp, T sum_dp_p, T scale", "T dx", "dx = p * (dp - sum_dp_p) * scale"),
    "scale_add": ("T x, T scale, T bias", "T y", "y = x * scale + bias"),
    "dropout": ("T x, T u, T p, T scale", "T y, T mask", "mask = (u >= p) * scale; y = x * mask"),
}
# (in_params, out_params, map_expr, reduce_expr, post_map_expr, identity) of each ReductionKernel
MEAN = "y = a / (_in_ind.size() / _out_ind.size())"
REDUCTION = {
    "mean": ("T x", "T y", "x", "a + b", MEAN, "0"),
    "variance": ("T x, T mean", "T y", "(x - mean) * (x - mean)", "a + b", MEAN, "0"),
    "mean_product": ("T x, T w", "T y", "x * w", "a + b", MEAN, "0"),
    "mean_triple": ("T x, T w, T z", "T y", "x * w * z", "a + b", MEAN, "0"),
    "sum_product": ("T x, T w", "T y", "x * w", "a + b", "y = a", "0"),
    "log_sum_exp_shifted": ("T x, T row_max", "T y", "exp(x - row_max)", "a + b", "y = log(a)", "0"),
}


@functools.cache
def compiled(xp) -> types.SimpleNamespace:
    """The kernels for one CuPy namespace, built once (CuPy compiles each on first use
    per dtype, and caches the binary on disk)."""
    kernels = {name: xp.ElementwiseKernel(*spec, name=f"npgpt_{name}") for name, spec in ELEMENTWISE.items()}
    kernels |= {name: xp.ReductionKernel(*spec, name=f"npgpt_{name}") for name, spec in REDUCTION.items()}
    return types.SimpleNamespace(**kernels)


def fused(x) -> types.SimpleNamespace | None:
    """The kernels for x's namespace, or None for float16 (the reference path)."""
    xp = namespace(x)
    return None if x.dtype == xp.float16 else compiled(xp)


# -- GELU -----------------------------------------------------------------------------------
def gelu_forward(x):
    """x (N, 4C) -> out (N, 4C), keeping x (the reference's cache)."""
    k = fused(x)
    return (k.gelu(x), x) if k else layers.gelu_forward(x)


def gelu_backward(dout, x):
    k = fused(x)
    return k.gelu_grad(dout, x) if k else layers.gelu_backward(dout, x)


# -- LayerNorm ------------------------------------------------------------------------------
def layer_norm_forward(x, w, b, eps):
    """x (N, C) -> out (N, C); the cache is the reference's (xhat, rstd, w)."""
    k = fused(x)
    if k is None:
        return layers.layer_norm_forward(x, w, b, eps)
    mean = k.mean(x, axis=1, keepdims=True)  # (N, 1)
    rstd = 1.0 / namespace(x).sqrt(k.variance(x, mean, axis=1, keepdims=True) + eps)  # (N, 1)
    xhat, out = k.layer_norm(x, mean, rstd, w, b)
    return out, (xhat, rstd, w)


def layer_norm_backward(dout, cache):
    xhat, rstd, w = cache
    k = fused(dout)
    if k is None:
        return layers.layer_norm_backward(dout, cache)
    mean_g = k.mean_product(dout, w, axis=1, keepdims=True)  # (N, 1)
    mean_gx = k.mean_triple(dout, w, xhat, axis=1, keepdims=True)  # (N, 1)
    dx = k.layer_norm_grad(dout, w, xhat, rstd, mean_g, mean_gx)
    return dx, k.sum_product(dout, xhat, axis=0), namespace(dout).sum(dout, axis=0)


# -- cross-entropy --------------------------------------------------------------------------
def cross_entropy_forward(logits, targets, ignore_index=layers.IGNORE_INDEX):
    """logits (N, V), targets (N,) -> mean loss over the scored rows (0-d, on the device).
    The cache keeps the logits with each row's max and log-sum-exp, not probabilities."""
    k = fused(logits)
    if k is None:
        return layers.cross_entropy_forward(logits, targets, ignore_index)
    xp = namespace(logits)
    valid = targets != ignore_index  # (N,)
    safe = xp.where(valid, targets, xp.zeros_like(targets))  # ignored rows read class 0 (weight 0)
    row_max = xp.max(logits, axis=1, keepdims=True)  # (N, 1)
    log_sum = k.log_sum_exp_shifted(logits, row_max, axis=1, keepdims=True)  # (N, 1)
    target_logit = xp.take_along_axis(logits, safe[:, None], axis=1)  # (N, 1)
    weight = xp.astype(valid, logits.dtype)
    weight = weight / xp.maximum(xp.sum(weight), 1.0)  # (N,)
    loss = xp.sum(weight * (row_max + log_sum - target_logit)[:, 0])
    return loss, (logits, row_max, log_sum, safe, weight)


def cross_entropy_backward(dloss, cache):
    """dlogits (N, V) = dloss * weight * (softmax(logits) - one_hot(targets))."""
    if len(cache) == 3:  # float16: the reference's cache
        return layers.cross_entropy_backward(dloss, cache)
    logits, row_max, log_sum, safe, weight = cache
    xp, k = namespace(logits), fused(logits)
    scale = (weight * dloss)[:, None]  # (N, 1)
    dlogits = k.softmax_scaled(logits, row_max, log_sum, scale)  # (N, V)
    rows = xp.arange(logits.shape[0], dtype=safe.dtype, device=logits.device)
    dlogits[rows, safe] -= scale[:, 0]  # one entry per row: distinct positions
    return dlogits


def lm_head_loss_forward(x, wte, targets, ignore_index=layers.IGNORE_INDEX):
    """The reference's composition (logits x @ wte^T, then cross-entropy), its cross-entropy this set's."""
    loss, ce = cross_entropy_forward(x @ wte.mT, targets, ignore_index)
    return loss, (x, wte, ce)


def lm_head_loss_backward(dloss, cache):
    """dx (N, C), dwte (V, C), through this set's cross-entropy backward."""
    x, wte, ce = cache
    dlogits = cross_entropy_backward(dloss, ce)  # (N, V)
    return dlogits @ wte, dlogits.mT @ x


# -- attention ------------------------------------------------------------------------------
def attention_forward(q, k, v, dropout=None, segments=None):
    """The reference's attention over whole arrays, its masked softmax in 3 passes (scale
    and mask in place, row max, log-sum-exp) and one kernel writing the probabilities over
    the scores; the cache is the reference's (q, k, v, probs, mask)."""
    kern = fused(q)
    if kern is None:
        return layers.attention_forward(q, k, v, dropout, segments)
    xp = namespace(q)
    T, S = q.shape[2], k.shape[2]
    visible = layers.visible_keys(T, S, segments, xp, q.device)  # (T, S) or (B, 1, T, S)
    zeros = xp.zeros(visible.shape, dtype=q.dtype, device=q.device)
    bias = xp.where(visible, zeros, zeros - math.inf)  # 0 where a key is visible, -inf elsewhere
    scores = q @ k.mT  # (B, NH, T, S)
    kern.scale_add(scores, 1.0 / math.sqrt(q.shape[3]), bias, scores)  # in place
    row_max = xp.max(scores, axis=-1, keepdims=True)  # (B, NH, T, 1): finite, each query sees itself
    log_sum = kern.log_sum_exp_shifted(scores, row_max, axis=-1, keepdims=True)  # (B, NH, T, 1)
    probs = kern.softmax_scaled(scores, row_max, log_sum, 1.0, scores)  # in place: the scores are not needed again
    dropped, mask = dropout(probs, 0) if dropout is not None else (probs, None)
    return dropped @ v, (q, k, v, probs, mask)


def attention_backward(dy, cache):
    """dq, dk, dv; the softmax backward p * (dp - sum(dp * p)) / sqrt(hs) in 2 passes."""
    q, k, v, probs, mask = cache
    kern = fused(dy)
    if kern is None:
        return layers.attention_backward(dy, cache)
    dv = layers.dropout_backward(probs, mask).mT @ dy  # (B, NH, S, hs)
    dprobs = layers.dropout_backward(dy @ v.mT, mask)  # (B, NH, T, S)
    sum_dp_p = kern.sum_product(dprobs, probs, axis=-1, keepdims=True)  # (B, NH, T, 1)
    dscores = kern.softmax_grad(probs, dprobs, sum_dp_p, 1.0 / math.sqrt(q.shape[3]), dprobs)  # in place
    return dscores @ k, dscores.mT @ q, dv


# -- dropout --------------------------------------------------------------------------------
def dropout_forward(x, p, uniform):
    """The reference's dropout, output and mask written by one kernel."""
    k = fused(x)
    if p == 0.0 or k is None:
        return layers.dropout_forward(x, p, uniform)
    return k.dropout(x, uniform, p, 1.0 / (1.0 - p))


KERNELS = REFERENCE.replace(
    "cupy-fused",
    gelu_forward=gelu_forward,
    gelu_backward=gelu_backward,
    layer_norm_forward=layer_norm_forward,
    layer_norm_backward=layer_norm_backward,
    cross_entropy_forward=cross_entropy_forward,
    cross_entropy_backward=cross_entropy_backward,
    lm_head_loss_forward=lm_head_loss_forward,
    lm_head_loss_backward=lm_head_loss_backward,
    dropout_forward=dropout_forward,
    dropout_backward=layers.dropout_backward,
    attention_forward=attention_forward,
    attention_backward=attention_backward,
)

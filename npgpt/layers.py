"""GPT-2's layers as their formulas: the plain reference every faster kernel must equal.

Every `*_forward` returns `(out, cache)`: the output and exactly what its backward needs.
Every `*_backward(dout, cache)` returns the gradients of its inputs (and parameters).
Nothing here is written for speed; the kernels a backend supplies (`npgpt.kernels`) are,
and each is property-tested against these. Arrays come from any array-API namespace
(NumPy, CuPy, array-api-strict), read off the arrays themselves: no layer imports NumPy.

Shapes: N rows (= B*T, the batch and time axes flattened), C channels, B batch, NH heads,
T queries, S keys (S >= T: the queries are the last T of S positions), hs head size,
V vocabulary.
"""

from __future__ import annotations

import math

from npgpt.namespaces import array_namespace as namespace

GELU_SCALE = math.sqrt(2.0 / math.pi)
IGNORE_INDEX = -100  # a target never scored (PyTorch's and transformers' convention)


# -- linear: x @ w + b ---------------------------------------------------------------
def linear_forward(x, w, b):
    """x (N, Cin), w (Cin, Cout), b (Cout,) or None (no bias) -> out (N, Cout)."""
    out = x @ w
    return (out if b is None else out + b), (x, w)


def linear_backward(dout, cache):
    """dout (N, Cout) -> dx (N, Cin), dw (Cin, Cout), db (Cout,)."""
    x, w = cache
    xp = namespace(dout)
    return dout @ w.mT, x.mT @ dout, xp.sum(dout, axis=0)


# -- layer norm: (x - mean) / sqrt(var + eps) * w + b, over the channels ----------------
def layer_norm_forward(x, w, b, eps):
    """x (N, C), w (C,), b (C,) -> out (N, C)."""
    xp = namespace(x)
    rstd = 1.0 / xp.sqrt(xp.var(x, axis=-1, keepdims=True) + eps)  # (N, 1)
    xhat = (x - xp.mean(x, axis=-1, keepdims=True)) * rstd  # (N, C), normalised
    return xhat * w + b, (xhat, rstd, w)


def layer_norm_backward(dout, cache):
    """dout (N, C) -> dx (N, C), dw (C,), db (C,).

    With g = dout * w, the normalisation's Jacobian gives
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    """
    xhat, rstd, w = cache
    xp = namespace(dout)
    g = dout * w  # (N, C)
    dx = rstd * (g - xp.mean(g, axis=-1, keepdims=True) - xhat * xp.mean(g * xhat, axis=-1, keepdims=True))
    return dx, xp.sum(dout * xhat, axis=0), xp.sum(dout, axis=0)


# -- GELU, tanh approximation ----------------------------------------------------------
def gelu_forward(x):
    """x (N, 4C) -> 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (N, 4C); keeps x."""
    return 0.5 * x * (1.0 + namespace(x).tanh(GELU_SCALE * (x + 0.044715 * x**3))), x


def gelu_backward(dout, x):
    """dout (N, 4C) -> dx (N, 4C), with t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3):
    d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    t = namespace(x).tanh(GELU_SCALE * (x + 0.044715 * x**3))
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_SCALE * (1.0 + 3 * 0.044715 * x**2))


# -- dropout ------------------------------------------------------------------------------
def dropout_forward(x, p, uniform):
    """Zero each element with probability p and scale the rest by 1/(1-p).

    `uniform` is a same-shaped array of U[0, 1) draws (from the backend's seeded RNG);
    p == 0 is the identity and keeps no mask. The mask is reused exactly by backward.
    """
    if p == 0.0:
        return x, None
    xp = namespace(x)
    mask = xp.astype(uniform >= p, x.dtype) * (1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dout, mask):
    return dout if mask is None else dout * mask


# -- causal self-attention over split heads ----------------------------------------------
def visible_keys(T, S, segments, xp, device):
    """Which keys each query may attend to: (T, S) booleans, or (B, 1, T, S) with segments.

    Query t sits at position S - T + t (a KV cache may hold the first S - T keys) and
    sees keys 0..S-T+t. `segments` (B, T) (then S == T) are document ids: a query sees
    only keys of its own document.
    """
    query_pos = xp.arange(S - T, S, device=device)  # (T,)
    causal = xp.arange(S, device=device)[None, :] <= query_pos[:, None]  # (T, S)
    if segments is None:
        return causal
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, S)
    return (causal & same)[:, None, :, :]


def attention_forward(q, k, v, dropout=None, segments=None):
    """Causal softmax attention: q (B, NH, T, hs), k and v (B, NH, S, hs) -> y (B, NH, T, hs).

    y = dropout(softmax(q k^T / sqrt(hs), masked to `visible_keys`)) v.
    `dropout(probs, t0) -> (dropped, mask)` drops attention probabilities when training
    (probs are rows t0.. of the (B, NH, T, S) matrix; here t0 = 0, all of it).
    """
    xp = namespace(q)
    T, S = q.shape[2], k.shape[2]
    visible = visible_keys(T, S, segments, xp, q.device)
    scores = (q @ k.mT) * (1.0 / math.sqrt(q.shape[3]))  # (B, NH, T, S)
    scores = xp.where(visible, scores, xp.full_like(scores, -math.inf))
    scores = scores - xp.max(scores, axis=-1, keepdims=True)
    probs = xp.exp(scores) / xp.sum(xp.exp(scores), axis=-1, keepdims=True)  # (B, NH, T, S)
    dropped, mask = dropout(probs, 0) if dropout is not None else (probs, None)
    return dropped @ v, (q, k, v, probs, mask)


def attention_backward(dy, cache):
    """dy (B, NH, T, hs) -> dq (B, NH, T, hs), dk, dv (B, NH, S, hs).

    Softmax backward per row: dscore = p * (dp - sum(dp * p)); masked entries have
    p == 0, so their gradient vanishes.
    """
    q, k, v, probs, mask = cache
    xp = namespace(dy)
    dv = dropout_backward(probs, mask).mT @ dy  # (B, NH, S, hs)
    dprobs = dropout_backward(dy @ v.mT, mask)  # (B, NH, T, S)
    dscores = probs * (dprobs - xp.sum(dprobs * probs, axis=-1, keepdims=True)) * (1.0 / math.sqrt(q.shape[3]))
    return dscores @ k, dscores.mT @ q, dv


# -- embeddings: token + position ---------------------------------------------------------
def embedding_forward(wte, wpe, ids, pos):
    """wte (V, C), wpe (n_ctx, C), ids (B, T) at positions pos (B, T) -> x (B, T, C)."""
    xp = namespace(wte)
    B, T = ids.shape
    x = xp.take(wte, xp.reshape(ids, (-1,)), axis=0) + xp.take(wpe, xp.reshape(pos, (-1,)), axis=0)  # (N, C)
    return xp.reshape(x, (B, T, wte.shape[1])), (ids, pos)


def embedding_backward(dx, cache, dwte, wpe_shape, backend):
    """dx (B, T, C) -> dwte (V, C), dwpe (n_ctx, C).

    The token rows are added into `dwte` (the tied LM head's gradient, or zeros) with a
    scatter-*add*: a token repeated in the batch collects every occurrence's gradient,
    where `dwte[ids] += dx` would keep only one of them. Positions likewise.
    """
    ids, pos = cache
    xp = backend.xp
    B, T, C = dx.shape
    rows = xp.reshape(dx, (B * T, C))  # (N, C)
    dwte = backend.index_add(dwte, xp.reshape(ids, (-1,)), rows)
    dwpe = backend.index_add(xp.zeros(wpe_shape, dtype=dx.dtype, device=backend.device), xp.reshape(pos, (-1,)), rows)
    return dwte, dwpe


# -- softmax cross-entropy with an ignore index -------------------------------------------
def cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX):
    """logits (N, V), targets (N,) ints -> mean of -log softmax(logits)[target] over the
    rows whose target != ignore_index, as a 0-d array (left on the device)."""
    xp = namespace(logits)
    N, V = logits.shape
    valid = xp.astype(targets != ignore_index, logits.dtype)  # (N,)
    one_hot = xp.astype(targets[:, None] == xp.arange(V, dtype=targets.dtype, device=logits.device), logits.dtype)
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)  # (N, V)
    log_probs = shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))  # (N, V)
    weight = valid / xp.maximum(xp.sum(valid), 1.0)  # (N,), 1/count on scored rows
    loss = -xp.sum(weight * xp.sum(one_hot * log_probs, axis=-1))
    return loss, (xp.exp(log_probs), one_hot, weight)


def cross_entropy_backward(dloss, cache):
    """dloss scalar -> dlogits (N, V) = dloss * weight * (probs - one_hot(targets))."""
    probs, one_hot, weight = cache
    return (probs - one_hot) * (dloss * weight)[:, None]


# -- the tied LM head and its loss: cross-entropy of logits x @ wte^T -----------------------
def lm_head_loss_forward(x, wte, targets, ignore_index=IGNORE_INDEX):
    """x (N, C), wte (V, C), targets (N,) -> the mean cross-entropy of the logits
    x @ wte^T (N, V), as `cross_entropy_forward` (a training step's head and loss)."""
    logits = x @ wte.mT  # (N, V)
    loss, ce = cross_entropy_forward(logits, targets, ignore_index)
    return loss, (x, wte, ce)


def lm_head_loss_backward(dloss, cache):
    """dloss scalar -> dx (N, C), dwte (V, C)."""
    x, wte, ce = cache
    dlogits = cross_entropy_backward(dloss, ce)  # (N, V)
    return dlogits @ wte, dlogits.mT @ x

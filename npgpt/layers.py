"""GPT-2's layers, each a forward/backward pair written against the array API.

Every `*_forward` returns `(out, cache)`: the output and exactly what its backward needs.
Every `*_backward(dout, cache)` returns the gradients of its inputs (and parameters).
Arrays come from any array-API namespace (NumPy, CuPy, array-api-strict); the namespace
is read off the arrays themselves, so no layer imports NumPy.

Shapes: N rows (= B*T, the batch and time axes flattened), C channels, B batch, NH heads,
T queries, S keys (S >= T: the queries are the last T of S positions), hs head size,
V vocabulary.
"""

from __future__ import annotations

import math

from npgpt.backend import array_namespace as namespace

GELU_SCALE = math.sqrt(2.0 / math.pi)


# -- linear: x @ w + b ---------------------------------------------------------------
def linear_forward(x, w, b):
    """x (N, Cin), w (Cin, Cout), b (Cout,) -> out (N, Cout)."""
    out = x @ w
    out += b
    return out, (x, w)


def linear_backward(dout, cache):
    """dout (N, Cout) -> dx (N, Cin), dw (Cin, Cout), db (Cout,)."""
    x, w = cache
    xp = namespace(dout)
    return dout @ w.mT, x.mT @ dout, xp.sum(dout, axis=0)


# -- layer norm: (x - mean) / sqrt(var + eps) * w + b, over the channels ----------------
def layer_norm_forward(x, w, b, eps):
    """x (N, C), w (C,), b (C,) -> out (N, C)."""
    xp = namespace(x)
    xhat = x - xp.mean(x, axis=-1, keepdims=True)  # (N, C), centred
    rstd = 1.0 / xp.sqrt(xp.mean(xhat * xhat, axis=-1, keepdims=True) + eps)  # (N, 1)
    xhat *= rstd  # (N, C), normalised
    out = xhat * w
    out += b
    return out, (xhat, rstd, w)


def layer_norm_backward(dout, cache):
    """dout (N, C) -> dx (N, C), dw (C,), db (C,).

    With g = dout * w, the normalisation's Jacobian gives
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    """
    xhat, rstd, w = cache
    xp = namespace(dout)
    dw = xp.sum(dout * xhat, axis=0)
    db = xp.sum(dout, axis=0)
    g = dout * w  # (N, C)
    dx = g - xp.mean(g, axis=-1, keepdims=True)
    dx -= xhat * xp.mean(g * xhat, axis=-1, keepdims=True)
    dx *= rstd
    return dx, dw, db


# -- GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) -----------
ROW_BLOCK = 64  # rows per block of a long elementwise chain: (64, 4C) floats stay in L2


def by_row_blocks(fn, *arrays):
    """fn applied to blocks of ROW_BLOCK rows, written into one (N, ...) result.

    GELU is a chain of ~10 elementwise passes; on a whole (N, 4C) array each pass goes to
    main memory, on a block of rows they all hit the cache (2x faster on these CPUs).
    """
    xp, N = namespace(arrays[0]), arrays[0].shape[0]
    out = xp.empty_like(arrays[0])
    for r0 in range(0, N, ROW_BLOCK):
        r1 = min(r0 + ROW_BLOCK, N)
        out[r0:r1, ...] = fn(*(a[r0:r1, ...] for a in arrays))
    return out


def gelu_forward(x):
    """x (N, 4C) -> out (N, 4C). Keeps only x: backward recomputes the tanh."""
    return by_row_blocks(gelu, x), x


def gelu(x):
    xp = namespace(x)
    u = x * x  # built in place: u = sqrt(2/pi) * x * (1 + 0.044715 x^2)
    u *= 0.044715
    u += 1.0
    u *= x
    u *= GELU_SCALE
    out = xp.tanh(u)
    out += 1.0
    out *= x
    out *= 0.5
    return out


def gelu_backward(dout, x):
    """dout (N, 4C) -> dx (N, 4C)."""
    return by_row_blocks(gelu_grad, dout, x)


def gelu_grad(dout, x):
    """d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(u)."""
    xp = namespace(x)
    x2 = x * x  # the rest is built in place: each temporary costs a pass
    u = 0.044715 * x2
    u += 1.0
    u *= x
    u *= GELU_SCALE  # u = sqrt(2/pi) (x + 0.044715 x^3)
    t = xp.tanh(u)
    du = 3 * 0.044715 * x2
    du += 1.0
    du *= GELU_SCALE  # du/dx
    dx = 1.0 - t * t  # dtanh/du
    dx *= du
    dx *= x
    dx *= 0.5  # 0.5 x (1 - t^2) du/dx
    t += 1.0
    t *= 0.5
    dx += t  # + 0.5 (1 + t)
    dx *= dout
    return dx


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
QUERY_BLOCK = 128  # queries per block: later blocks see more keys, none sees the future


def attention_forward(q, k, v, dropout=None):
    """Causal softmax attention.

    q (B, NH, T, hs), k and v (B, NH, S, hs) -> y (B, NH, T, hs). Query t sits at
    position S - T + t (a KV cache may hold the first S - T keys) and sees keys 0..S-T+t.
    Queries go in blocks of QUERY_BLOCK, each against only the keys it can see, so the
    masked upper triangle of the T x S score matrix is (mostly) never computed.
    `dropout(probs) -> (dropped, mask)` drops attention probabilities when training.
    """
    xp = namespace(q)
    T, S = q.shape[2], k.shape[2]
    y = xp.empty(q.shape, dtype=q.dtype, device=q.device)
    blocks = []
    for t0 in range(0, T, QUERY_BLOCK):
        t1 = min(t0 + QUERY_BLOCK, T)
        s1 = S - T + t1  # keys visible to the block's last query
        att = attention_probs(q[:, :, t0:t1, :], k[:, :, :s1, :])  # (B, NH, Tb, s1)
        att_dropped, mask = dropout(att) if dropout is not None else (att, None)
        y[:, :, t0:t1, :] = att_dropped @ v[:, :, :s1, :]
        blocks.append((t0, t1, s1, att, mask))
    return y, (q, k, v, blocks)


def attention_probs(q, k):
    """softmax(q k^T / sqrt(hs)) with the causal mask: q (B, NH, Tb, hs) are the last Tb
    of the S positions of k (B, NH, S, hs) -> probabilities (B, NH, Tb, S)."""
    xp = namespace(q)
    Tb, S = q.shape[2], k.shape[2]
    att = (q * (1.0 / math.sqrt(q.shape[3]))) @ k.mT  # (B, NH, Tb, S), scores
    if Tb > 1:  # only the last Tb columns hold masked entries: key s > query position
        pos = xp.arange(Tb, dtype=xp.int64, device=q.device)
        future = pos[None, :] > pos[:, None]  # (Tb, Tb): key after query
        att[:, :, :, S - Tb :] += xp.where(future, -xp.inf, xp.zeros((Tb, Tb), dtype=att.dtype, device=q.device))
    att -= xp.max(att, axis=-1, keepdims=True)
    att = xp.exp(att)
    att /= xp.sum(att, axis=-1, keepdims=True)
    return att


def attention_backward(dy, cache):
    """dy (B, NH, T, hs) -> dq (B, NH, T, hs), dk, dv (B, NH, S, hs), block by block.

    Softmax backward per row: dscore = p * (dp - sum(dp * p)); masked entries have
    p == 0, so their gradient vanishes.
    """
    q, k, v, blocks = cache
    xp = namespace(dy)
    scale = 1.0 / math.sqrt(q.shape[3])
    dq, dk, dv = xp.empty_like(q), xp.zeros_like(k), xp.zeros_like(v)
    for t0, t1, s1, att, mask in blocks:
        dyb = dy[:, :, t0:t1, :]  # (B, NH, Tb, hs)
        att_dropped = att if mask is None else att * mask
        dv[:, :, :s1, :] += att_dropped.mT @ dyb  # (B, NH, s1, hs)
        datt = dropout_backward(dyb @ v[:, :, :s1, :].mT, mask)  # (B, NH, Tb, s1)
        datt -= xp.sum(datt * att, axis=-1, keepdims=True)
        datt *= att
        datt *= scale
        dq[:, :, t0:t1, :] = datt @ k[:, :, :s1, :]
        dk[:, :, :s1, :] += datt.mT @ q[:, :, t0:t1, :]
    return dq, dk, dv


# -- embeddings: token + position ---------------------------------------------------------
def embedding_forward(wte, wpe, ids, start):
    """wte (V, C), wpe (n_ctx, C), ids (B, T) at positions start..start+T-1 -> x (B, T, C)."""
    xp = namespace(wte)
    B, T = ids.shape
    x = xp.reshape(xp.take(wte, xp.reshape(ids, (-1,)), axis=0), (B, T, wte.shape[1]))
    x += wpe[start : start + T, :]
    return x, ids


def embedding_backward(dx, ids, dwte, wpe_shape, backend):
    """dx (B, T, C) -> dwte (V, C), dwpe (n_ctx, C).

    The token rows are added into `dwte` (the tied LM head's gradient, or zeros) with a
    scatter-*add*: a token repeated in the batch collects every occurrence's gradient,
    where `dwte[ids] += dx` would keep only one of them.
    """
    xp = backend.xp
    B, T, C = dx.shape
    dwte = backend.index_add(dwte, xp.reshape(ids, (-1,)), xp.reshape(dx, (B * T, C)))
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype, device=backend.device)
    dwpe[:T, :] = xp.sum(dx, axis=0)
    return dwte, dwpe


# -- softmax cross-entropy with an ignore index -------------------------------------------
def cross_entropy_forward(logits, targets, ignore_index=-1):
    """logits (N, V), targets (N,) ints -> mean loss over rows whose target != ignore_index.

    Returns the loss as a 0-d array (left on the device) and a cache holding the
    probabilities, which replace the logits to save a (N, V) buffer.
    """
    xp = namespace(logits)
    valid = targets != ignore_index  # (N,)
    safe = xp.where(valid, targets, xp.zeros_like(targets))  # (N,), ignored rows read class 0
    logits -= xp.max(logits, axis=-1, keepdims=True)
    target_logit = xp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]  # (N,)
    probs = xp.exp(logits)  # (N, V), unnormalised
    total = xp.sum(probs, axis=-1, keepdims=True)  # (N, 1)
    probs /= total
    weight = xp.astype(valid, logits.dtype) / xp.maximum(xp.sum(xp.astype(valid, logits.dtype)), 1.0)
    loss = xp.sum(weight * (xp.log(total[:, 0]) - target_logit))
    return loss, (probs, safe, weight)


def cross_entropy_backward(dloss, cache, backend):
    """dloss scalar -> dlogits (N, V) = dloss * weight * (probs - one_hot(targets)).

    The one-hot term is subtracted with the backend's scatter-add on the flattened
    (N * V,) array, so no (N, V) one-hot matrix is ever built.
    """
    probs, safe, weight = cache
    xp = backend.xp
    N, V = probs.shape
    scale = weight * dloss  # (N,)
    dlogits = probs  # the probabilities are not needed again: scaled in place
    dlogits *= scale[:, None]
    flat_ids = xp.arange(N, dtype=safe.dtype, device=backend.device) * V + safe
    dlogits = backend.index_add(xp.reshape(dlogits, (N * V, 1)), flat_ids, -scale[:, None])
    return xp.reshape(dlogits, (N, V))

"""GPT-2: the decoder stack, its backward pass, and the KV cache.

Each op runs through the backend's kernel set (`backend.kernels`, see `npgpt.kernels`):
`npgpt.layers`, the plain formulas, unless the backend supplies faster equivalents.

    ids (B, T) -> wte[ids] + wpe[pos] -> L x block -> ln_f -> @ wte.T -> logits (B, T, V)
    block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))

Public API:
    model = GPT.init(GPTConfig(...), backend="numpy", seed=0)     # or GPT.load(path)
    logits = model.forward(ids)                                    # (B, T, V)
    cache = model.new_cache(B); model.forward(ids_chunk, cache)    # incremental decoding
    loss, grads = model.loss_and_grads(ids, targets)               # training, grads keyed like params
    loss = model.loss(ids, targets)                                # evaluation
    model.loss_and_grads(ids, targets, segments=docs)              # packed documents (B, T) ids
    model.loss_and_grads(ids, targets, grad_ready=fn)              # fn(names, grads) as grads finish
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npgpt import layers
from npgpt.backend import Backend, array_namespace, get_backend
from npgpt.checkpoint import load_checkpoint, save_checkpoint
from npgpt.config import GPTConfig

FLOAT_DTYPES = ("float16", "float32", "float64")


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name (as in GPT-2's published checkpoints) and shape, in order."""
    V, C, L = config.vocab_size, config.n_embd, config.n_layer
    shapes = {"wte.weight": (V, C), "wpe.weight": (config.n_ctx, C)}
    for i in range(L):
        shapes |= block_param_shapes(i, C)
    return shapes | {"ln_f.weight": (C,), "ln_f.bias": (C,)}


def block_param_shapes(i: int, C: int) -> dict[str, tuple[int, ...]]:
    """Block i's 12 parameters and their shapes, in order."""
    h = f"h.{i}."
    return {
        h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
        h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
        h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
        h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
        h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
        h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
    }  # fmt: skip


def init_params(config: GPTConfig, seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """GPT-2's initialisation, on the host: weights and embeddings N(0, 0.02), the two
    residual projections N(0, 0.02 / sqrt(2 L)), biases 0, LayerNorm gains 1.

    Drawn in float64 in `param_shapes` order from one seed, so float32 and float64
    models of the same seed differ only by rounding; drawn a row block at a time, so no
    float64 copy of a whole embedding is ever held.
    """
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            params[name] = np.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype=dtype)
        else:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            params[name] = value = np.empty(shape, dtype=dtype)
            for r in range(0, shape[0], 4096):  # the same stream as one draw of the whole
                value[r : r + 4096] = rng.normal(0.0, std, size=value[r : r + 4096].shape)
    return params


class KVCache:
    """Keys and values of the positions seen so far, for each layer.

    k[i], v[i]: (B, NH, n_ctx, hs), preallocated; positions [0, length) are filled. Each
    is a view of one array for all layers, `keys` and `values` (L, B, NH, n_ctx, hs) (on
    NumPy a large allocation, which Linux may back with huge pages: a decode step's
    attention read the cache ~10% faster than from 2 x n_layer arrays of their own).
    """

    def __init__(self, config: GPTConfig, batch_size: int, backend: Backend, dtype):
        xp, L = backend.xp, config.n_layer
        shape = (L, batch_size, config.n_head, config.n_ctx, config.head_size)
        self.keys, self.values = (xp.zeros(shape, dtype=dtype, device=backend.device) for _ in range(2))
        self.k = [self.keys[i, ...] for i in range(L)]  # (B, NH, n_ctx, hs) each
        self.v = [self.values[i, ...] for i in range(L)]
        self.batch_size, self.capacity, self.length = batch_size, config.n_ctx, 0
        self.kernel_state = None  # what a kernel set keeps for this sequence (NumPy's compiled decode step: its parameters)

    def append(self, layer: int, k, v):
        """k, v (B, NH, T, hs) of new positions -> all keys and values so far (B, NH, S, hs)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end, :] = k
        self.v[layer][:, :, start:end, :] = v
        return self.k[layer][:, :, :end, :], self.v[layer][:, :, :end, :]


class GPT:
    """GPT-2 parameters on a backend, with forward, backward and incremental decoding."""

    def __init__(self, config: GPTConfig, params: dict, backend: Backend | str = "numpy"):
        self.config = config
        self.backend = get_backend(backend)
        self.params = params
        check_params(params, config)
        self.dtype = params["wte.weight"].dtype

    # -- construction and files ----------------------------------------------------------
    @classmethod
    def init(cls, config: GPTConfig, backend: Backend | str = "numpy", seed: int = 0, dtype: str = "float32"):
        """A freshly initialised model (GPT-2's init, reproducible from `seed`)."""
        return cls.from_numpy(config, init_params(config, seed, dtype), backend)

    @classmethod
    def from_numpy(cls, config: GPTConfig, host_params: dict[str, np.ndarray], backend="numpy", dtype=None):
        """Upload host parameters to the backend's device once (cast to `dtype` if given)."""
        backend = get_backend(backend)
        check_params(host_params, config)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        target = backend.dtype(dtype or str(host_params["wte.weight"].dtype))
        return cls(config, {k: backend.asarray(v, dtype=target) for k, v in host_params.items()}, backend)

    @classmethod
    def load(cls, path, backend: Backend | str = "numpy", dtype: str | None = None):
        """A model from an npgpt safetensors checkpoint (see `npgpt.checkpoint`)."""
        params, config = load_checkpoint(path)
        return cls.from_numpy(config, params, backend, dtype)

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {k: self.backend.to_numpy(v) for k, v in self.params.items()}

    def save(self, path):
        save_checkpoint(Path(path), self.to_numpy(), self.config)

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.config, batch_size, self.backend, self.dtype)

    # -- inference -----------------------------------------------------------------------
    def forward(self, ids, cache: KVCache | None = None, last_only: bool = False, segments=None):
        """Logits (B, T, V) for token ids (B, T); (B, 1, V) for the last position only
        with `last_only` (all that sampling needs: it skips most of the LM head's work).

        With a cache, the T ids continue the sequence it holds (positions
        cache.length .. cache.length + T - 1) and their keys/values are appended to it.
        `segments` (B, T) packs several documents into one row: see `segment_positions`.
        Without a cache the rows are independent: the kernels' `over_batch` may run them
        in pieces up to the final LayerNorm; the LM head then runs once over every row
        (no copy of the pieces' logits into one array).
        """
        ids = self.as_ids(ids)
        if cache is not None:
            return self._forward(ids, cache, last_only=last_only, segments=segments)[0]
        xp = self.backend.xp
        pieces = self.backend.kernels.over_batch(
            lambda b0, b1: self._forward(ids[b0:b1, ...], last_only=last_only, segments=_rows(segments, b0, b1), head=False)[0],
            *ids.shape,
        )  # fmt: skip
        xf = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)  # (B, T, C), T = 1 with last_only
        B, T, C = xf.shape
        return xp.reshape(self._lm_head(xp.reshape(xf, (B * T, C))), (B, T, self.config.vocab_size))

    def as_ids(self, ids):
        """Token ids as a (B, T) integer array on the device. Host ids (lists, NumPy) are
        checked first: shape, dtype and 0 <= id < V."""
        xp = self.backend.xp
        if isinstance(ids, (np.ndarray, list, tuple)):
            host = np.asarray(ids)
            if host.ndim != 2 or host.shape[1] == 0 or not np.issubdtype(host.dtype, np.integer):
                raise ValueError(f"ids must be a non-empty (B, T) array of integers, got shape {host.shape} dtype {host.dtype}")
            if host.size and (host.min() < 0 or host.max() >= self.config.vocab_size):
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got values in [{host.min()}, {host.max()}]")
            return self.backend.asarray(host, dtype=xp.int64)
        if ids.ndim != 2 or ids.shape[1] == 0 or not xp.isdtype(ids.dtype, "integral"):
            raise ValueError(f"ids must be a non-empty (B, T) integer array, got shape {ids.shape} dtype {ids.dtype}")
        return ids  # already on the device: checking values would cost a device->host sync

    def as_segments(self, segments, shape):
        """Document ids (B, T) on the device, each document one contiguous run of a row
        (checked for host arrays; device arrays are trusted, as ids are)."""
        if isinstance(segments, (np.ndarray, list, tuple)):
            host = np.asarray(segments)
            if host.shape != tuple(shape) or not np.issubdtype(host.dtype, np.integer):
                raise ValueError(f"segments must be a (B, T) = {tuple(shape)} integer array, got shape {host.shape} dtype {host.dtype}")
            for row in host:
                starts = np.concatenate([[True], row[1:] != row[:-1]])
                if np.count_nonzero(starts) != len(np.unique(row)):
                    raise ValueError("each document id in a row of segments must be one contiguous run")
            return self.backend.asarray(host, dtype=self.backend.xp.int64)
        if tuple(segments.shape) != tuple(shape):
            raise ValueError(f"segments must have the ids' shape {tuple(shape)}, got {tuple(segments.shape)}")
        return segments

    def _forward(self, ids, cache=None, rngs: list[np.random.Generator] | None = None, last_only=False, keep=False,
                 segments=None, rows=None, head=True):  # fmt: skip
        """ids (B, T) -> logits (B, T, V) and, with `keep`, the `Activations` the backward
        needs (without it each block's activations are freed as soon as it is done).
        `head=False` (not with `rows`): the final LayerNorm's output instead of logits, for
        the caller's LM head: (B, T, C), or (N, C) with `keep`.

        `rngs` (one generator per row of ids) turn dropout on (training); without them
        dropout is off. `rows` (n,) (not
        with `keep` or `last_only`): the flat positions b * T + t the LM head runs on;
        the logits are then (n, V).
        """
        p, cfg, xp, kernels = self.params, self.config, self.backend.xp, self.backend.kernels
        B, T = ids.shape
        start = 0 if cache is None else cache.length
        if cache is not None and segments is not None:
            raise ValueError("segments cannot be combined with a KV cache: run packed documents without a cache")
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"the KV cache holds batch size {cache.batch_size}, the ids have {B}")
        if start + T > cfg.n_ctx:
            where = f"the cache holds {start} tokens; " if cache is not None else ""
            raise ValueError(
                f"{where}{start + T} tokens exceed the context of {cfg.n_ctx}: "
                "crop the sequence to its last n_ctx tokens or start a new cache"
            )
        if cache is not None and rngs is None and not keep and head and rows is None:
            logits = kernels.decode_step(p, cfg, ids, cache)  # a kernel set may run a decode step whole: (1, V), or None
            if logits is not None:
                cache.length = start + T
                return xp.reshape(logits, (B, T, cfg.vocab_size)), None
        if segments is not None:
            segments = self.as_segments(segments, (B, T))
            pos = segment_positions(segments)  # (B, T)
        else:
            pos = xp.broadcast_to(xp.arange(start, start + T, dtype=xp.int64, device=self.backend.device), (B, T))
        drop = self._dropout(rngs)
        x, embedding = kernels.embedding_forward(p["wte.weight"], p["wpe.weight"], ids, pos)  # (B, T, C)
        x, embedding_drop = drop(x)
        x = xp.reshape(x, (B * T, cfg.n_embd))  # (N, C), rows are tokens
        blocks = []
        last_rows = last_only and segments is None and not keep  # the last block takes each row's last position alone
        for i in range(cfg.n_layer):
            x, block = self._block_forward(i, x, B, cache, drop, segments, last_rows and i == cfg.n_layer - 1)
            if keep:
                blocks.append(block)
            del block  # without `keep`, this block's activations go before the next runs
        if last_rows:
            T = 1  # x is (B, C) already
        elif last_only:
            x, T = xp.reshape(x, (B, T, cfg.n_embd))[:, -1, :], 1  # (B, C)
        elif rows is not None:
            assert not keep, "the backward needs the LM head on every position"
            x = xp.take(x, rows, axis=0)  # (n, C)
        xf, ln_f = kernels.layer_norm_forward(x, p["ln_f.weight"], p["ln_f.bias"], cfg.layer_norm_epsilon)
        if cache is not None:
            cache.length = start + ids.shape[1]
        acts = Activations(B, T, embedding, embedding_drop, blocks, ln_f) if keep else None
        if not head:
            return (xf if keep else xp.reshape(xf, (B, T, cfg.n_embd))), acts
        logits = self._lm_head(xf)  # (N, V)
        return (logits if rows is not None else xp.reshape(logits, (B, T, cfg.vocab_size))), acts

    def _lm_head(self, xf):
        """The LM head, tied to the token embedding: a linear layer without bias, xf (N, C) -> logits (N, V)."""
        return self.backend.kernels.linear_forward(xf, self.params["wte.weight"].mT, None)[0]

    def _block_forward(self, i, x, B, cache, drop, segments, last_row=False):
        """One pre-LayerNorm block on rows x (N, C) -> (N, C), and its `BlockActivations`.
        `last_row` (the last block, when only the last position's logits are wanted): every
        position's keys and values, the rest for each row's last position only -> (B, C)."""
        p, cfg, xp, kernels = self.params, self.config, self.backend.xp, self.backend.kernels
        N, C = x.shape
        T, NH, hs = N // B, cfg.n_head, cfg.head_size
        h = f"h.{i}."
        # attention branch
        a, ln_1 = kernels.layer_norm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], cfg.layer_norm_epsilon)
        qkv, c_attn = kernels.linear_forward(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # (N, 3C)
        qkv = xp.permute_dims(xp.reshape(qkv, (B, T, 3, NH, hs)), (2, 0, 3, 1, 4))  # (3, B, NH, T, hs)
        q, k, v = qkv[0, ...], qkv[1, ...], qkv[2, ...]
        if cache is not None:
            k, v = cache.append(i, k, v)  # (B, NH, S, hs)
        if last_row:  # the last query against every key; from here on one row per sequence
            q, x, N = q[:, :, -1:, :], xp.reshape(x, (B, T, C))[:, -1, :], B  # (B, NH, 1, hs), (B, C)
        y, attn = kernels.attention_forward(q, k, v, drop if drop.p else None, segments)
        y = xp.reshape(xp.permute_dims(y, (0, 2, 1, 3)), (N, C))  # (N, C), heads side by side
        y, attn_c_proj = kernels.linear_forward(y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        y, attn_drop = drop(y)
        x = x + y
        # MLP branch
        m, ln_2 = kernels.layer_norm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], cfg.layer_norm_epsilon)
        m, c_fc = kernels.linear_forward(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])  # (N, 4C)
        m, gelu = kernels.gelu_forward(m)
        m, mlp_c_proj = kernels.linear_forward(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])  # (N, C)
        m, mlp_drop = drop(m)
        x = x + m
        return x, BlockActivations(ln_1, c_attn, attn, attn_c_proj, attn_drop, ln_2, c_fc, gelu, mlp_c_proj, mlp_drop)

    def _dropout(self, rngs):
        return Dropout(self.config.dropout if rngs is not None else 0.0, rngs, self.backend, self.dtype)

    # -- training ------------------------------------------------------------------------
    def loss(self, ids, targets, ignore_index: int = layers.IGNORE_INDEX, segments=None):
        """Mean cross-entropy (a 0-d device array) of predicting targets (B, T) from ids (B, T).

        The rows are scored in pieces (the kernels' `over_batch`), their means weighted by
        their scored targets. With host targets (NumPy), the LM head runs only on the
        positions whose target is not `ignore_index`, and a piece without any is skipped.
        """
        xp, kernels = self.backend.xp, self.backend.kernels
        ids = self.as_ids(ids)
        B, T = ids.shape
        host = isinstance(targets, (np.ndarray, list, tuple))
        if host:
            targets = np.asarray(targets)
            self._targets(targets, ignore_index)  # checked before any work
        if tuple(targets.shape) != (B, T):
            raise ValueError(f"targets must have the ids' shape {(B, T)}, got {tuple(targets.shape)}")

        def piece(b0, b1):  # -> (mean loss, number of scored targets) of rows [b0, b1), or None
            flat, rows = (np if host else xp).reshape(targets[b0:b1, ...], (-1,)), None
            if host:
                scored = np.flatnonzero(flat != ignore_index)
                if scored.size == 0:
                    return None
                if scored.size < flat.size:
                    flat, rows = flat[scored], self.backend.asarray(scored, dtype=xp.int64)
                count = scored.size
            else:
                count = xp.sum(xp.astype(flat != ignore_index, self.dtype))
            logits, _ = self._forward(ids[b0:b1, ...], segments=_rows(segments, b0, b1), rows=rows)  # (n, V) with rows
            loss, _ = kernels.cross_entropy_forward(self._flat(logits), self._targets(flat, ignore_index), ignore_index)
            return loss, count

        pieces = [p for p in kernels.over_batch(piece, B, T) if p is not None]
        if not pieces:  # every target ignored: 0, as the kernel's mean
            return xp.zeros((), dtype=self.dtype, device=self.backend.device)
        if len(pieces) == 1:
            return pieces[0][0]
        total = sum(count for _, count in pieces)
        total = total if host else xp.maximum(total, 1.0)  # device targets, all ignored: 0
        return sum(loss * (count / total) for loss, count in pieces)

    def loss_and_grads(self, ids, targets, ignore_index: int = layers.IGNORE_INDEX,
                       rng: np.random.Generator | None = None, segments=None, grad_ready=None):  # fmt: skip
        """Forward, cross-entropy and the full backward pass.

        Returns the mean loss (0-d device array) and a dict of gradients with the same
        keys and shapes as `params`. Targets equal to `ignore_index` are left out of the
        mean. Pass `rng` to train with the config's dropout (each row of the batch draws
        its masks from its own generator, spawned from `rng` in row order), `segments`
        (B, T) to train on packed documents. `grad_ready(names, grads)` is called as soon
        as the listed parameters' gradients are final: ln_f's after the LM head, then each
        block's 12 from the last block down, then wte's and wpe's (wte is tied to the head)
        at the end.

        The rows may run in pieces (the kernels' `over_train_batch`): then each piece's
        forward runs apart, the LM head and loss on the whole batch (its kernels sharing out
        the vocabulary), each piece's backward apart from the head's gradient at its rows,
        and the token and position embeddings' gradients of the pieces, in order, are added
        into the head's; the pieces' other gradients sum, piece by piece in order, to the
        whole batch's; `grad_ready` then sees the same calls, in the same order, after that sum.
        """
        xp, kernels = self.backend.xp, self.backend.kernels
        ids = self.as_ids(ids)
        B, T = ids.shape
        shape = tuple(np.shape(targets) if isinstance(targets, (list, tuple)) else targets.shape)
        if shape != (B, T):
            raise ValueError(f"targets must have the ids' shape {(B, T)}, got {shape}")
        targets = xp.reshape(self._targets(targets, ignore_index), (B, T))
        rngs = rng.spawn(B) if rng is not None and self.config.dropout else None  # per row: any split draws alike
        wte = self.params["wte.weight"]

        def forward(b0, b1):  # -> the whole batch's (loss, gradients), else rows [b0, b1)'s (ln_f output, activations)
            xf, acts = self._forward(ids[b0:b1, ...], rngs=None if rngs is None else rngs[b0:b1], keep=True,
                                     segments=_rows(segments, b0, b1), head=False)  # fmt: skip
            if b1 - b0 < B:
                return (b0, b1), xf, acts
            loss, head = kernels.lm_head_loss_forward(xf, wte, xp.reshape(targets, (-1,)), ignore_index)  # of logits xf @ wte^T
            dxf, dwte = kernels.lm_head_loss_backward(1.0, head)
            del head  # the (N, V) buffer goes before the blocks' gradients are made
            return loss, self._backward(dxf, dwte, acts, grad_ready or _no_hook)

        pieces = kernels.over_train_batch(forward, B, T)
        if len(pieces) == 1:
            return pieces[0]
        acts = {rows: piece_acts for rows, _, piece_acts in pieces}
        loss, head = kernels.lm_head_loss_forward(xp.concat([xf for _, xf, _ in pieces], axis=0), wte,
                                                  xp.reshape(targets, (-1,)), ignore_index)  # fmt: skip
        dxf, dwte = kernels.lm_head_loss_backward(1.0, head)
        del head  # as in forward()

        def backward(b0, b1):  # -> rows [b0, b1)'s gradients but the embeddings', and dx at their embedding
            if (b0, b1) not in acts:
                raise RuntimeError(f"over_train_batch cut the backward's rows {(b0, b1)} unlike the forward's {list(acts)}")
            grads = {}
            dx = self._backward_blocks(dxf[b0 * T : b1 * T, ...], acts[(b0, b1)], grads, _no_hook)
            return grads, dx

        parts = kernels.over_train_batch(backward, B, T)
        grads, names = parts[0][0], list(parts[0][0])

        def add(i):  # the pieces' gradients of parameter i, summed in piece order
            for piece_grads, _ in parts[1:]:
                grads[names[i]] += piece_grads[names[i]]

        kernels.over_parameters(add, [math.prod(grads[name].shape) for name in names])
        dwpe = None
        for (_, _, piece_acts), (_, dx) in zip(pieces, parts):
            dwte, piece_dwpe = kernels.embedding_backward(dx, piece_acts.embedding, dwte, self.params["wpe.weight"].shape,
                                                          self.backend)  # fmt: skip
            dwpe = piece_dwpe if dwpe is None else dwpe + piece_dwpe
        grads["wte.weight"], grads["wpe.weight"] = dwte, dwpe
        if grad_ready is not None:
            C = self.config.n_embd
            grad_ready(["ln_f.weight", "ln_f.bias"], grads)
            for i in reversed(range(self.config.n_layer)):
                grad_ready(list(block_param_shapes(i, C)), grads)
            grad_ready(["wte.weight", "wpe.weight"], grads)
        return loss, {name: grads[name] for name in self.params}  # in parameter order

    def _backward(self, dxf, dwte_head, acts: Activations, grad_ready):
        """The LM head's gradients (dxf (N, C) at its input, dwte (V, C) of the tied
        embedding as its weight) -> gradients of every parameter, walking the forward in reverse."""
        grads = {}
        dx = self._backward_blocks(dxf, acts, grads, grad_ready)
        grads["wte.weight"], grads["wpe.weight"] = self.backend.kernels.embedding_backward(
            dx, acts.embedding, dwte_head, self.params["wpe.weight"].shape, self.backend
        )
        grad_ready(["wte.weight", "wpe.weight"], grads)
        return {name: grads[name] for name in self.params}  # in parameter order

    def _backward_blocks(self, dxf, acts: Activations, grads, grad_ready):
        """dxf (N, C) at the final LayerNorm's output -> dx (B, T, C) at the embeddings'
        sum (through their dropout); fills grads for ln_f and every block. Consumes `acts`:
        each block's activations are let go once its backward has read them."""
        cfg, xp, kernels = self.config, self.backend.xp, self.backend.kernels
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = kernels.layer_norm_backward(dxf, acts.ln_f)
        grad_ready(["ln_f.weight", "ln_f.bias"], grads)
        for i in reversed(range(cfg.n_layer)):
            dx = self._block_backward(i, dx, acts.B, acts.blocks[i], grads)
            acts.blocks[i] = None  # read: freed now, not at the step's end (the peak then holds one block's gradients, not all)
            grad_ready(list(block_param_shapes(i, cfg.n_embd)), grads)
        return kernels.dropout_backward(xp.reshape(dx, (acts.B, acts.T, cfg.n_embd)), acts.embedding_drop)

    def _block_backward(self, i, dx, B, act: BlockActivations, grads):
        """dx (N, C) at the block's output -> dx at its input; fills grads for h.{i}.*"""
        xp, cfg, kernels = self.backend.xp, self.config, self.backend.kernels
        h = f"h.{i}."
        N, C = dx.shape
        T, NH, hs = N // B, cfg.n_head, cfg.head_size
        # MLP branch: x_out = x_mid + mlp(ln_2(x_mid))
        dm = kernels.dropout_backward(dx, act.mlp_drop)
        dm, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = kernels.linear_backward(dm, act.mlp_c_proj)
        dm = kernels.gelu_backward(dm, act.gelu)
        dm, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = kernels.linear_backward(dm, act.c_fc)
        dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = kernels.layer_norm_backward(dm, act.ln_2)
        dx = dx + dm
        act.mlp_drop = act.mlp_c_proj = act.gelu = act.c_fc = act.ln_2 = dm = None  # read: freed before the attention backward
        # attention branch: x_mid = x_in + attn(ln_1(x_in))
        dy = kernels.dropout_backward(dx, act.attn_drop)
        dy, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = kernels.linear_backward(dy, act.attn_c_proj)
        dy = xp.permute_dims(xp.reshape(dy, (B, T, NH, hs)), (0, 2, 1, 3))  # (B, NH, T, hs)
        dq, dk, dv = kernels.attention_backward(dy, act.attn)
        act.attn = act.attn_c_proj = dy = None  # read: freed before the product's gradients are made
        dqkv = xp.reshape(xp.stack([xp.permute_dims(d, (0, 2, 1, 3)) for d in (dq, dk, dv)], axis=2), (N, 3 * C))  # (B, T, 3, NH, hs) -> (N, 3C)
        dq = dk = dv = None
        da, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = kernels.linear_backward(dqkv, act.c_attn)
        da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = kernels.layer_norm_backward(da, act.ln_1)
        return dx + da

    def _flat(self, logits):
        return self.backend.xp.reshape(logits, (-1, self.config.vocab_size))  # (N, V)

    def _targets(self, targets, ignore_index: int):
        """Targets (B, T) -> (N,) int64 on the device. Host targets are checked to be ids
        in [0, V) or `ignore_index`; device ones are trusted (a check would cost a sync)."""
        xp = self.backend.xp
        if isinstance(targets, (np.ndarray, list, tuple)):
            host = np.asarray(targets)
            wrong = (host != ignore_index) & ((host < 0) | (host >= self.config.vocab_size))
            if np.any(wrong):
                raise ValueError(f"targets must be ids in [0, {self.config.vocab_size}) or the ignore index "
                                 f"{ignore_index}, got {host[wrong].flat[0]} (pass ignore_index= to match your labels)")  # fmt: skip
            targets = self.backend.asarray(host, dtype=xp.int64)
        return xp.reshape(targets, (-1,))


def _no_hook(names, grads):
    """The default `grad_ready`: nothing to do."""


def _rows(segments, b0, b1):
    """Rows [b0, b1) of `segments` (B, T) (host or device), or None."""
    if isinstance(segments, (list, tuple)):
        segments = np.asarray(segments)
    return None if segments is None else segments[b0:b1, ...]


def segment_positions(segments):
    """Position ids (B, T) restarting at 0 where each document of `segments` (B, T) starts:
    a token's position is how many earlier tokens of its row share its document id."""
    xp = array_namespace(segments)
    T = segments.shape[1]
    earlier = xp.arange(T, device=segments.device)[None, :] < xp.arange(T, device=segments.device)[:, None]  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return xp.sum(xp.astype(same & earlier, xp.int64), axis=-1)  # (B, T)


@dataclass
class BlockActivations:
    """What block i's backward reads: each field is one kernel's cache (N = B*T rows)."""

    ln_1: object  # LayerNorm of the block input x_in (N, C): xhat (N, C), rstd (N, 1)
    c_attn: object  # linear on ln_1's output (N, C) -> qkv (N, 3C)
    attn: object  # attention: q (B, NH, T, hs), k, v (B, NH, S, hs), probabilities (B, NH, T, S)
    attn_c_proj: object  # linear on the heads side by side (N, C) -> (N, C)
    attn_drop: object  # dropout mask of the attention branch (N, C), or None
    ln_2: object  # LayerNorm of x_mid = x_in + attention branch (N, C)
    c_fc: object  # linear on ln_2's output (N, C) -> (N, 4C)
    gelu: object  # GELU's cache: the reference keeps its input (N, 4C)
    mlp_c_proj: object  # linear on GELU's output (N, 4C) -> (N, C)
    mlp_drop: object  # dropout mask of the MLP branch (N, C), or None


@dataclass
class Activations:
    """What the model's backward reads, as llm.c's ActivationTensors."""

    B: int  # batch
    T: int  # positions per row (1 with last_only)
    embedding: object  # embedding cache: ids (B, T), positions (B, T)
    embedding_drop: object  # dropout mask of the embeddings (B, T, C), or None
    blocks: list[BlockActivations]  # one per layer, in order
    ln_f: object  # final LayerNorm of the last block's output (N, C)


class Dropout:
    """GPT-2's dropout sites (embeddings, attention probabilities, residual branches),
    drawing masks from seeded host generators, one per row of the batch (row b's part of
    every mask from rngs[b], so a row's masks do not depend on which rows run with it);
    p == 0 makes every call the identity."""

    def __init__(self, p, rngs, backend, dtype):
        self.p, self.rngs, self.backend, self.dtype = p, rngs, backend, dtype

    def __call__(self, x, t0=0):
        """x -> (dropped, mask); `t0` (where attention's probability rows start) is unused:
        every call draws fresh. p == 0: (x, None) at once, as the kernel would return."""
        if self.p == 0.0:  # inference: no draws, no kernel call (a decode step makes 25 of these)
            return x, None
        return self.backend.kernels.dropout_forward(x, self.p, self._uniform(x.shape))

    def _uniform(self, shape):
        """U[0, 1) of `shape`, whose leading rows (B, ...) or (B * T, ...) split evenly by row of the batch."""
        if self.p == 0.0:
            return None
        xp, per_row = self.backend.xp, (math.prod(shape) // len(self.rngs),)
        draws = [self.backend.uniform(rng, per_row, self.dtype) for rng in self.rngs]
        return xp.reshape(draws[0] if len(draws) == 1 else xp.stack(draws), shape)


def dtype_name(dtype) -> str:
    """"float32" for NumPy's, CuPy's and array-api-strict's float32 alike."""
    return str(dtype).rsplit(".", 1)[-1]


def check_params(params: dict, config: GPTConfig):
    """Every expected parameter present with its shape and one float dtype; say which is not."""
    expected = param_shapes(config)
    missing = [name for name in expected if name not in params]
    unknown = [name for name in params if name not in expected]
    if missing or unknown:
        raise ValueError(f"parameters do not match the config: missing {missing[:5]}, unexpected {unknown[:5]}")
    dtypes = {dtype_name(params[name].dtype) for name in expected}
    if len(dtypes) != 1 or not dtypes <= set(FLOAT_DTYPES):
        raise ValueError(f"parameters must share one float dtype of {FLOAT_DTYPES}, got {sorted(dtypes)}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(params[name].shape)}, the config needs {shape}")

"""GPT-2: the decoder stack built from `layers`, its backward pass, and the KV cache.

    ids (B, T) -> wte[ids] + wpe[pos] -> L x block -> ln_f -> @ wte.T -> logits (B, T, V)
    block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))

Public API:
    model = GPT.init(GPTConfig(...), backend="numpy", seed=0)     # or GPT.load(path)
    logits = model.forward(ids)                                    # (B, T, V)
    cache = model.new_cache(B); model.forward(ids_chunk, cache)    # incremental decoding
    loss, grads = model.loss_and_grads(ids, targets)               # training, grads keyed like params
    loss = model.loss(ids, targets)                                # evaluation
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from npgpt import layers
from npgpt.backend import Backend, get_backend
from npgpt.checkpoint import load_checkpoint, save_checkpoint
from npgpt.config import GPTConfig

FLOAT_DTYPES = ("float16", "float32", "float64")


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name (as in GPT-2's published checkpoints) and shape, in order."""
    V, C, L = config.vocab_size, config.n_embd, config.n_layer
    shapes = {"wte.weight": (V, C), "wpe.weight": (config.n_ctx, C)}
    for i in range(L):
        shapes |= {
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
            f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, 4 * C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
            f"h.{i}.mlp.c_proj.weight": (4 * C, C), f"h.{i}.mlp.c_proj.bias": (C,),
        }  # fmt: skip
    return shapes | {"ln_f.weight": (C,), "ln_f.bias": (C,)}


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

    k[i], v[i]: (B, NH, n_ctx, hs), preallocated; positions [0, length) are filled.
    """

    def __init__(self, config: GPTConfig, batch_size: int, backend: Backend, dtype):
        xp, shape = backend.xp, (batch_size, config.n_head, config.n_ctx, config.head_size)
        self.k = [xp.zeros(shape, dtype=dtype, device=backend.device) for _ in range(config.n_layer)]
        self.v = [xp.zeros(shape, dtype=dtype, device=backend.device) for _ in range(config.n_layer)]
        self.batch_size, self.capacity, self.length = batch_size, config.n_ctx, 0

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
    def forward(self, ids, cache: KVCache | None = None, last_only: bool = False):
        """Logits (B, T, V) for token ids (B, T); (B, 1, V) for the last position only
        with `last_only` (all that sampling needs: it skips most of the LM head's work).

        With a cache, the T ids continue the sequence it holds (positions
        cache.length .. cache.length + T - 1) and their keys/values are appended to it.
        """
        logits, _ = self._forward(self.as_ids(ids), cache, last_only=last_only)
        return logits

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

    def _forward(self, ids, cache=None, rng: np.random.Generator | None = None, last_only=False, keep=False):
        """ids (B, T) -> logits (B, T, V) and, with `keep`, the tape of per-layer caches the
        backward needs (without it each block's activations are freed as soon as it is done).

        `rng` turns dropout on (training); without it dropout is off.
        """
        p, cfg, xp = self.params, self.config, self.backend.xp
        B, T = ids.shape
        start = 0 if cache is None else cache.length
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"the KV cache holds batch size {cache.batch_size}, the ids have {B}")
        if start + T > cfg.n_ctx:
            where = f"the cache holds {start} tokens; " if cache is not None else ""
            raise ValueError(
                f"{where}{start + T} tokens exceed the context of {cfg.n_ctx}: "
                "crop the sequence to its last n_ctx tokens or start a new cache"
            )
        drop = self._dropout(rng)
        x, emb_cache = layers.embedding_forward(p["wte.weight"], p["wpe.weight"], ids, start)  # (B, T, C)
        x, emb_drop = drop(x)
        x = xp.reshape(x, (B * T, cfg.n_embd))  # (N, C), rows are tokens
        block_caches = []
        for i in range(cfg.n_layer):
            x, block_cache = self._block_forward(i, x, B, cache, drop)
            if keep:
                block_caches.append(block_cache)
            del block_cache  # without `keep`, this block's activations go before the next runs
        if last_only:
            x, T = xp.reshape(x, (B, T, cfg.n_embd))[:, -1, :], 1  # (B, C)
        xf, lnf_cache = layers.layer_norm_forward(x, p["ln_f.weight"], p["ln_f.bias"], cfg.layer_norm_epsilon)
        logits = xf @ p["wte.weight"].mT  # (N, V), the LM head tied to the token embedding
        if cache is not None:
            cache.length = start + ids.shape[1]
        return xp.reshape(logits, (B, T, cfg.vocab_size)), (emb_cache, emb_drop, block_caches, lnf_cache, xf)

    def _block_forward(self, i, x, B, cache, drop):
        """One pre-LayerNorm block on rows x (N, C) -> (N, C)."""
        p, cfg, xp = self.params, self.config, self.backend.xp
        N, C = x.shape
        T, NH, hs = N // B, cfg.n_head, cfg.head_size
        h = f"h.{i}."
        # attention branch
        a, ln1 = layers.layer_norm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], cfg.layer_norm_epsilon)
        qkv, c_attn = layers.linear_forward(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # (N, 3C)
        qkv = xp.permute_dims(xp.reshape(qkv, (B, T, 3, NH, hs)), (2, 0, 3, 1, 4))  # (3, B, NH, T, hs)
        q, k, v = qkv[0, ...], qkv[1, ...], qkv[2, ...]
        if cache is not None:
            k, v = cache.append(i, k, v)  # (B, NH, S, hs)
        y, att = layers.attention_forward(q, k, v, drop if drop.p else None)
        y = xp.reshape(xp.permute_dims(y, (0, 2, 1, 3)), (N, C))  # (N, C), heads side by side
        y, c_proj = layers.linear_forward(y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        y, attn_drop = drop(y)
        x = x + y
        # MLP branch
        m, ln2 = layers.layer_norm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], cfg.layer_norm_epsilon)
        m, c_fc = layers.linear_forward(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])  # (N, 4C)
        m, gelu = layers.gelu_forward(m)
        m, mlp_proj = layers.linear_forward(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])  # (N, C)
        m, mlp_drop = drop(m)
        x = x + m
        return x, (ln1, c_attn, att, c_proj, attn_drop, ln2, c_fc, gelu, mlp_proj, mlp_drop)

    def _dropout(self, rng):
        return Dropout(self.config.dropout if rng is not None else 0.0, rng, self.backend, self.dtype)

    # -- training ------------------------------------------------------------------------
    def loss(self, ids, targets, ignore_index: int = -1):
        """Mean cross-entropy (a 0-d device array) of predicting targets (B, T) from ids (B, T)."""
        logits, _ = self._forward(self.as_ids(ids))
        loss, _ = layers.cross_entropy_forward(self._flat(logits), self._targets(targets, ignore_index), ignore_index)
        return loss

    def loss_and_grads(self, ids, targets, ignore_index: int = -1, rng: np.random.Generator | None = None):
        """Forward, cross-entropy and the full backward pass.

        Returns the mean loss (0-d device array) and a dict of gradients with the same
        keys and shapes as `params`. Targets equal to `ignore_index` are left out of the
        mean. Pass `rng` to train with the config's dropout.
        """
        logits, tape = self._forward(self.as_ids(ids), rng=rng, keep=True)
        loss, ce = layers.cross_entropy_forward(self._flat(logits), self._targets(targets, ignore_index), ignore_index)
        dlogits = layers.cross_entropy_backward(1.0, ce, self.backend)  # (N, V)
        return loss, self._backward(dlogits, tape)

    def _backward(self, dlogits, tape):
        """dlogits (N, V) -> gradients of every parameter, walking the forward in reverse."""
        p, cfg, xp = self.params, self.config, self.backend.xp
        emb_cache, emb_drop, block_caches, lnf_cache, xf = tape
        grads = {}
        # LM head tied to wte: logits = xf @ wte.T
        dwte_head = dlogits.mT @ xf  # (V, C)
        dx = dlogits @ p["wte.weight"]  # (N, C)
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = layers.layer_norm_backward(dx, lnf_cache)
        for i in reversed(range(cfg.n_layer)):
            dx = self._block_backward(i, dx, block_caches[i], grads)
        ids = emb_cache
        B, T = ids.shape
        dx = layers.dropout_backward(xp.reshape(dx, (B, T, cfg.n_embd)), emb_drop)
        grads["wte.weight"], grads["wpe.weight"] = layers.embedding_backward(
            dx, ids, dwte_head, p["wpe.weight"].shape, self.backend
        )
        return {name: grads[name] for name in p}  # in parameter order

    def _block_backward(self, i, dx, block_cache, grads):
        """dx (N, C) at the block's output -> dx at its input; fills grads for h.{i}.*"""
        xp, cfg = self.backend.xp, self.config
        ln1, c_attn, att, c_proj, attn_drop, ln2, c_fc, gelu, mlp_proj, mlp_drop = block_cache
        h = f"h.{i}."
        N, C = dx.shape
        NH, hs = cfg.n_head, cfg.head_size
        # MLP branch: x_out = x_mid + mlp(ln_2(x_mid))
        dm = layers.dropout_backward(dx, mlp_drop)
        dm, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = layers.linear_backward(dm, mlp_proj)
        dm = layers.gelu_backward(dm, gelu)
        dm, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = layers.linear_backward(dm, c_fc)
        dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layers.layer_norm_backward(dm, ln2)
        dx = dx + dm
        # attention branch: x_mid = x_in + attn(ln_1(x_in))
        dy = layers.dropout_backward(dx, attn_drop)
        dy, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = layers.linear_backward(dy, c_proj)
        B = att[0].shape[0]  # att = (q, k, v, blocks), q (B, NH, T, hs)
        T = N // B
        dy = xp.permute_dims(xp.reshape(dy, (B, T, NH, hs)), (0, 2, 1, 3))  # (B, NH, T, hs)
        dq, dk, dv = layers.attention_backward(dy, att)
        dqkv = xp.reshape(xp.permute_dims(xp.stack([dq, dk, dv]), (1, 3, 0, 2, 4)), (N, 3 * C))  # (N, 3C)
        da, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = layers.linear_backward(dqkv, c_attn)
        da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layers.layer_norm_backward(da, ln1)
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


class Dropout:
    """GPT-2's dropout sites (embeddings, attention probabilities, residual branches),
    drawing masks from a seeded host generator; p == 0 makes every call the identity."""

    def __init__(self, p, rng, backend, dtype):
        self.p, self.rng, self.backend, self.dtype = p, rng, backend, dtype

    def __call__(self, x):
        return layers.dropout_forward(x, self.p, self._uniform(x.shape))

    def _uniform(self, shape):
        return None if self.p == 0.0 else self.backend.uniform(self.rng, shape, self.dtype)


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

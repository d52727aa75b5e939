"""AdamW, global-norm gradient clipping and the warm-up + cosine learning-rate schedule.

Written against the array API (`backend.xp`), updating parameters and moments in place,
so the optimizer never leaves the device: the clipping factor stays a 0-d device array
and is always multiplied in (no host-side `if norm > max_norm`). `adamw_update` and
`sum_of_squares` are the plain references of the backend's optimizer kernels
(`backend.kernels`, see `npgpt.kernels`); the NumPy backend's are blocked and threaded.
A step hands its parameters to the set's `over_parameters` schedule (the reference: one by
one; NumPy's: whole parameters shared among the threads).

The arithmetic follows PyTorch's `torch.optim.AdamW` (single-tensor path) step for step:

    p  <- p * (1 - lr * wd)                         # decoupled weight decay
    m  <- beta1 m + (1 - beta1) g
    v  <- beta2 v + (1 - beta2) g^2
    p  <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from npgpt.namespaces import array_namespace as namespace

if TYPE_CHECKING:  # npgpt.backend imports the kernel sets, which import this module
    from npgpt.backend import Backend

# Parameters decayed by default: the 2-D weight matrices of the blocks. Biases, LayerNorm
# gains and the two embeddings (wte is also the LM head) are not, unless configured.
EMBEDDINGS = ("wte.weight", "wpe.weight")


def default_decay(name: str, shape: tuple[int, ...], decay_embeddings: bool = False) -> bool:
    """Whether weight decay applies to a parameter: the blocks' 2-D weight matrices only,
    as minGPT does. nanoGPT also decays wte and wpe (it decays every tensor of 2 or more
    dimensions); decay_embeddings=True gives nanoGPT's groups."""
    if name in EMBEDDINGS:
        return decay_embeddings
    return len(shape) == 2


class AdamW:
    """AdamW over a dict of parameters on one backend; updates them in place.

    `lr` is passed to every `step` (the schedule lives outside), so the optimizer holds
    only what must be checkpointed: the step count and the two moments per parameter.
    """

    def __init__(
        self,
        params: dict,
        backend: Backend,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        decay_embeddings: bool = False,
        decay: dict[str, bool] | None = None,
    ):
        xp = backend.xp
        self.params, self.backend = params, backend
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        if decay is None:  # given explicitly for pieces of parameters (ZeRO-1 shards)
            decay = {name: default_decay(name, tuple(p.shape), decay_embeddings) for name, p in params.items()}
        self.decay = decay
        self.m = {name: xp.zeros_like(p) for name, p in params.items()}  # first moments
        self.v = {name: xp.zeros_like(p) for name, p in params.items()}  # second moments
        self.t = 0  # steps taken

    def step(self, grads: dict, lr: float, grad_scale=None):
        """One update of every parameter from `grads` (same keys), at learning rate `lr`;
        `grad_scale` (a 0-d device array, e.g. `clip_factor`'s): each gradient times it,
        multiplied into the moments' updates (`grads` are left as they are)."""
        self.t += 1
        kernels, names = self.backend.kernels, list(self.params)

        def update(i):
            name = names[i]
            wd = self.weight_decay if self.decay[name] else 0.0
            kernels.adamw_update(self.params[name], grads[name], self.m[name], self.v[name], lr, wd, self.beta1,
                                 self.beta2, self.t, self.eps, grad_scale)  # fmt: skip

        kernels.over_parameters(update, [size(self.params[name]) for name in names])

    # -- checkpoints: moments to and from host NumPy --------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """(tensors, scalars): the moments as host arrays named m.<param> / v.<param>,
        and the step count and hyperparameters (JSON-able)."""
        to_np = self.backend.to_numpy
        tensors = {f"m.{k}": to_np(a) for k, a in self.m.items()} | {f"v.{k}": to_np(a) for k, a in self.v.items()}
        scalars = {"t": self.t, "betas": [self.beta1, self.beta2], "eps": self.eps, "weight_decay": self.weight_decay}
        return tensors, scalars

    def load_state_dict(self, tensors: dict[str, np.ndarray], scalars: dict):
        """Restore moments and step count saved by `state_dict` (shapes must match)."""
        for moments, prefix in ((self.m, "m."), (self.v, "v.")):
            for name, current in moments.items():
                host = tensors.get(prefix + name)
                if host is None or tuple(host.shape) != tuple(current.shape):
                    got = None if host is None else tuple(host.shape)
                    raise ValueError(f"optimizer state for {prefix}{name}: expected shape {tuple(current.shape)}, found {got}")
                moments[name] = self.backend.asarray(np.array(host), dtype=current.dtype)
        self.t = int(scalars["t"])
        self.beta1, self.beta2 = scalars["betas"]
        self.eps, self.weight_decay = scalars["eps"], scalars["weight_decay"]


def adamw_update(p, g, m, v, lr, weight_decay, beta1, beta2, step, eps, grad_scale=None):
    """One AdamW step of one parameter p from its gradient g (times `grad_scale` unless
    None), the moments m and v updated in place; `step` counts from 1, weight_decay 0
    means no decay."""
    if grad_scale is not None:
        g = g * grad_scale
    step_size = lr / (1.0 - beta1**step)
    sqrt_bc2 = math.sqrt(1.0 - beta2**step)
    if weight_decay:
        p *= 1.0 - lr * weight_decay
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    denom = namespace(v).sqrt(v)
    denom /= sqrt_bc2
    denom += eps
    p -= step_size * (m / denom)


def sum_of_squares(g):
    """sum(g * g) over every element, as a 0-d array."""
    return namespace(g).sum(g * g)


def global_norm(grads: dict, backend: Backend):
    """The L2 norm of all gradients together, as a 0-d device array."""
    kernels, gs = backend.kernels, list(grads.values())
    return backend.xp.sqrt(sum(kernels.over_parameters(lambda i: kernels.sum_of_squares(gs[i]), [size(g) for g in gs])))


def size(a) -> int:
    """Elements of an array (any array-API namespace's)."""
    return math.prod(a.shape)


def clip_grad_norm(grads: dict, max_norm: float, backend: Backend):
    """Scale all gradients in place so their global L2 norm is at most `max_norm`.

    As `torch.nn.utils.clip_grad_norm_`: factor = min(1, max_norm / (norm + 1e-6)),
    always multiplied in, so nothing is read back to the host. Returns the norm before
    clipping as a 0-d device array (for logging).
    """
    norm = global_norm(grads, backend)
    factor = clip_factor(norm, max_norm, backend.xp)
    for g in grads.values():
        g *= factor
    return norm


def clipped_step(opt: AdamW, grads: dict, max_norm: float, lr: float):
    """`clip_grad_norm` then `opt.step(grads, lr)`, the clipping factor handed to the step
    as its `grad_scale` (one pass over the gradients fewer; `grads` are left unscaled);
    max_norm 0: no clipping. Returns the norm before clipping as a 0-d device array."""
    norm = global_norm(grads, opt.backend)
    opt.step(grads, lr, clip_factor(norm, max_norm, opt.backend.xp) if max_norm > 0 else None)
    return norm


def clip_factor(norm, max_norm: float, xp):
    """min(1, max_norm / (norm + 1e-6)) as a 0-d device array: what clipping multiplies by."""
    return xp.minimum(max_norm / (norm + 1e-6), 1.0)


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """Learning rate for 0-based `step`: linear warm-up over `warmup` steps to `max_lr`,
    then half a cosine down to `min_lr` at `decay_steps`, and `min_lr` after it."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup) / max(1, decay_steps - warmup)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)

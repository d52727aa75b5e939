"""The kernel interface: the set of layer functions the model calls, supplied by a backend.

`REFERENCE` is `npgpt.layers`, the plain formulas. A backend may supply a faster set
(`Backend(..., kernels=...)`, read back as `backend.kernels`); `npgpt.kernels.numpy_fast`
is NumPy's. A set is built from the reference by replacing whole operations:

    kernels = REFERENCE.replace("cupy-fused", gelu_forward=my_gelu, gelu_backward=my_gelu_grad)

Each operation is a forward/backward pair sharing a private `cache` format, so a forward
and its backward are replaced together (or an op's reference backward is named
explicitly, when the replacement keeps the reference's cache). A backward reads its cache
once (the model frees it after): a set's backward may write its result over the cache's
arrays, as numpy_fast's GELU does. Signatures, as in
`npgpt.layers` (N rows, C channels, B batch, NH heads, T queries, S keys, V vocab):

    linear_forward(x (N, Cin), w (Cin, Cout), b (Cout,) or None) -> out (N, Cout), cache
    linear_backward(dout, cache) -> dx, dw, db
    layer_norm_forward(x (N, C), w (C,), b (C,), eps) -> out (N, C), cache
    layer_norm_backward(dout, cache) -> dx, dw, db
    gelu_forward(x (N, 4C)) -> out, cache;   gelu_backward(dout, cache) -> dx
        (inside a piece of `over_batch`, where no backward follows, may write out over x)
    dropout_forward(x, p, uniform) -> out, mask;   dropout_backward(dout, mask) -> dx
    attention_forward(q (B, NH, T, hs), k, v (B, NH, S, hs), dropout=None, segments=None)
        -> y (B, NH, T, hs), cache   (dropout(probs, t0) -> dropped, mask: probs are rows
        t0.. of the (B, NH, T, S) probability matrix; segments (B, T) document ids, S == T)
    attention_backward(dy, cache) -> dq, dk, dv
    embedding_forward(wte (V, C), wpe (n_ctx, C), ids (B, T), pos (B, T)) -> x (B, T, C), cache
    embedding_backward(dx (B, T, C), cache, dwte (V, C), wpe_shape, backend) -> dwte, dwpe
    cross_entropy_forward(logits (N, V), targets (N,), ignore_index) -> loss (0-d), cache
        (may overwrite `logits`)
    cross_entropy_backward(dloss, cache) -> dlogits (N, V)
    lm_head_loss_forward(x (N, C), wte (V, C), targets (N,), ignore_index) -> loss (0-d), cache
        (the cross-entropy of the tied LM head's logits x @ wte^T: a training step's, whose
        (N, V) logits no caller reads)
    lm_head_loss_backward(dloss, cache) -> dx (N, C), dwte (V, C)

the three schedules (reference: `whole_batch` and `each_parameter` here), not pairs:

    over_batch(fn, B, T) -> [fn(b0, b1), ...] for ranges [b0, b1) covering the B rows of
        a batch (T positions each) in order; the rows are independent (an inference
        forward or loss), so a set may run the ranges apart, on several threads
    over_train_batch(fn, B, T) -> the same, for a training step's batch: fn(b0, b1) is
        a piece's forward (the model then runs the LM head on the whole batch) or its
        backward, whose gradients the caller sums in range order; called twice a step
        (forwards, backwards), it must cut the same (B, T) into the same ranges
    over_parameters(fn, sizes) -> [fn(0), ..., fn(n - 1)] for n parameters of `sizes`
        elements: independent work on each (an AdamW update, a sum of squares, the
        pieces' gradient sum), so a set may run them apart, on several threads

one optional fused step (reference: `no_fused_step`, which always returns None):

    decode_step(params, config, ids (1, 1), cache) -> logits (1, V), or None
        (one cached position, B = T = 1, from the token through the embedding, every
        block, the final LayerNorm and the LM head in one call, its keys and values
        written into the cache at cache.length (which the model then moves on); None where
        the set has no such step for these inputs: the model then runs the step op by op,
        as it always does for the reference)

and the optimizer's two (reference: `npgpt.optim`), which are not pairs:

    adamw_update(p, g, m, v, lr, weight_decay, beta1, beta2, step, eps, grad_scale=None) -> None
        (one AdamW step of one parameter from g times grad_scale: p, m and v updated in place)
    sum_of_squares(g) -> sum(g * g) (0-d)

NPGPT_KERNELS=reference in the environment makes every backend use `REFERENCE`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from npgpt import layers, optim

OPS = ("linear", "layer_norm", "gelu", "dropout", "attention", "embedding", "cross_entropy", "lm_head_loss")
SCHEDULE = ("over_batch", "over_train_batch", "over_parameters")
FUSED = ("decode_step",)
OPTIMIZER = ("adamw_update", "sum_of_squares")
NAMES = tuple(f"{op}_{way}" for op in OPS for way in ("forward", "backward")) + SCHEDULE + FUSED + OPTIMIZER
ENV = "NPGPT_KERNELS"


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One function per name in `NAMES` (signatures in this module's docstring)."""

    name: str
    linear_forward: Callable
    linear_backward: Callable
    layer_norm_forward: Callable
    layer_norm_backward: Callable
    gelu_forward: Callable
    gelu_backward: Callable
    dropout_forward: Callable
    dropout_backward: Callable
    attention_forward: Callable
    attention_backward: Callable
    embedding_forward: Callable
    embedding_backward: Callable
    cross_entropy_forward: Callable
    cross_entropy_backward: Callable
    lm_head_loss_forward: Callable
    lm_head_loss_backward: Callable
    over_batch: Callable
    over_train_batch: Callable
    over_parameters: Callable
    decode_step: Callable
    adamw_update: Callable
    sum_of_squares: Callable

    def replace(self, name: str, **kernels: Callable) -> Kernels:
        """A set named `name` with whole operations (forward and backward), the schedule or
        optimizer kernels replaced."""
        unknown = sorted(set(kernels) - set(NAMES))
        if unknown:
            raise ValueError(f"unknown kernels {unknown}; the interface has {list(NAMES)}")
        halves = [op for op in OPS if (f"{op}_forward" in kernels) != (f"{op}_backward" in kernels)]
        if halves:
            raise ValueError(f"replace both halves of {halves}: a forward's cache is read by its own backward")
        return dataclasses.replace(self, name=name, **kernels)


def whole_batch(fn, B: int, T: int) -> list:
    """[fn(0, B)]: the reference runs a batch in one piece."""
    return [fn(0, B)]


def each_parameter(fn, sizes) -> list:
    """[fn(0), ..., fn(len(sizes) - 1)]: the reference takes the parameters one by one."""
    return [fn(i) for i in range(len(sizes))]


def no_fused_step(params, config, ids, cache) -> None:
    """None: the reference has no fused decode step (the model runs it op by op)."""
    return None


REFERENCE = Kernels("reference", over_batch=whole_batch, over_train_batch=whole_batch, over_parameters=each_parameter,
                    decode_step=no_fused_step,
                    **{name: getattr(optim if name in OPTIMIZER else layers, name) for name in NAMES if name not in SCHEDULE + FUSED})  # fmt: skip


def select_kernels(supplied: Kernels | None) -> Kernels:
    """The set a backend runs: `supplied` (None: the reference), unless $NPGPT_KERNELS says
    "reference" ("" or "backend" keep the backend's own)."""
    choice = os.environ.get(ENV, "")
    if choice not in ("", "backend", "reference"):
        raise ValueError(f"{ENV} must be 'reference' or 'backend', got {choice!r}")
    return REFERENCE if supplied is None or choice == "reference" else supplied

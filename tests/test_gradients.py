"""The backward pass against float64 central finite differences, on tiny random models.

For every parameter tensor P the numerical gradient is, element by element,
(loss(P + h e_i) - loss(P - h e_i)) / 2h, and the analytic gradient from
`GPT.loss_and_grads` must match it with a norm-wise relative error
||analytic - numeric|| / max(||analytic||, ||numeric||) <= 1e-6.
Gradients that are exactly zero by symmetry -- the key bias (a constant added to every
key of a query's row cancels in the softmax), and with a single position also the query
part -- are compared absolutely instead.

A negative control proves the check has teeth: an embedding backward that assigns
instead of adding (`dW[ids] += dY` in NumPy keeps one of the repeated ids) must fail it.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt.backend import NumpyBackend
from npgpt.config import GPTConfig
from npgpt.kernels import REFERENCE, numpy_fast, threads
from npgpt.layers import IGNORE_INDEX
from npgpt.model import GPT, param_shapes

REL_TOL = 1e-6
ABS_TOL = 1e-9  # for gradients that vanish by symmetry (FD noise is ~1e-11 here)
H = 1e-6  # truncation error ~H^2 (1e-12) stays far below the tolerance; rounding ~1e-10


def random_model(cfg: GPTConfig, seed: int, dropout_seed=None) -> GPT:
    """A float64 model with O(1) random weights (GPT-2's 0.02 init makes gradients tiny)
    and non-trivial LayerNorm gains and biases, so every path carries signal."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            params[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            params[name] = 0.2 * rng.standard_normal(shape)
        else:
            params[name] = 0.4 * rng.standard_normal(shape)
    return GPT.from_numpy(cfg, params, "numpy")


def numerical_grad(loss_fn, param: np.ndarray) -> np.ndarray:
    """Central differences of loss_fn() w.r.t. every element of `param` (perturbed in place)."""
    grad = np.zeros_like(param)
    flat, gflat = param.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + H
        up = loss_fn()
        flat[i] = old - H
        down = loss_fn()
        flat[i] = old
        gflat[i] = (up - down) / (2 * H)
    return grad


def symmetric_zero_slices(name: str, cfg: GPTConfig, T: int) -> list[slice]:
    """Parts of a gradient that vanish exactly by symmetry (compared absolutely)."""
    C = cfg.n_embd
    if name.endswith("attn.c_attn.bias"):
        return [slice(0, C), slice(C, 2 * C)] if T == 1 else [slice(C, 2 * C)]
    return []


def grad_errors(model: GPT, ids, targets, ignore_index=IGNORE_INDEX, dropout_seed=None, segments=None) -> dict[str, str]:
    """Check every parameter; return {name: what is wrong} for those that fail."""
    rng = lambda: None if dropout_seed is None else np.random.default_rng(dropout_seed)  # noqa: E731
    if dropout_seed is None:
        loss_fn = lambda: float(model.loss(ids, targets, ignore_index, segments=segments))  # noqa: E731
    else:  # the same mask seed for every evaluation: a deterministic function of the params
        loss_fn = lambda: float(model.loss_and_grads(ids, targets, ignore_index, rng=rng(), segments=segments)[0])  # noqa: E731
    _, grads = model.loss_and_grads(ids, targets, ignore_index, rng=rng(), segments=segments)
    failures = {}
    T = np.asarray(ids).shape[1]
    for name, param in model.params.items():
        analytic, numeric = np.asarray(grads[name]), numerical_grad(loss_fn, param)
        assert analytic.shape == param.shape, name
        zero = symmetric_zero_slices(name, model.config, T)
        for part in zero:
            worst = max(np.abs(analytic[part]).max(), np.abs(numeric[part]).max())
            if worst > ABS_TOL:
                failures[name + f"[{part.start}:{part.stop}]"] = f"should vanish by symmetry, max |grad| {worst:.2e}"
        keep = np.ones(param.shape[0], dtype=bool) if param.ndim == 1 else None
        if keep is not None:
            for part in zero:
                keep[part] = False
        a, n = (analytic[keep], numeric[keep]) if keep is not None else (analytic, numeric)
        scale = max(np.linalg.norm(a), np.linalg.norm(n))
        err = np.linalg.norm(a - n)
        if err > REL_TOL * scale and err > ABS_TOL * np.sqrt(a.size):  # FD rounding adds up over elements
            failures[name] = f"relative error {err / scale:.2e} (|analytic| {np.linalg.norm(a):.3e}, |numeric| {np.linalg.norm(n):.3e})"
    return failures


sizes = st.fixed_dictionaries(
    dict(
        n_layer=st.integers(1, 2),
        n_head=st.integers(1, 2),
        head_size=st.integers(1, 3),
        T=st.integers(1, 4),
        B=st.integers(1, 2),
        vocab=st.integers(2, 7),
        seed=st.integers(0, 2**16),
    )
)


@settings(max_examples=10, deadline=None)
@given(sizes)
def test_every_gradient_matches_finite_differences(s):
    cfg = GPTConfig(vocab_size=s["vocab"], n_ctx=s["T"] + 1, n_embd=s["n_head"] * s["head_size"],
                    n_head=s["n_head"], n_layer=s["n_layer"])  # fmt: skip
    model = random_model(cfg, s["seed"])
    rng = np.random.default_rng(s["seed"] + 1)
    ids = rng.integers(0, cfg.vocab_size, size=(s["B"], s["T"]))
    targets = rng.integers(0, cfg.vocab_size, size=(s["B"], s["T"]))
    assert grad_errors(model, ids, targets) == {}


def test_ignore_index_rows_carry_no_gradient():
    """Targets equal to the ignore index leave the mean and the gradient entirely."""
    cfg = GPTConfig(vocab_size=5, n_ctx=4, n_embd=4, n_head=2, n_layer=1)
    model = random_model(cfg, 3)
    ids = np.array([[1, 2, 3, 1], [4, 0, 0, 2]])
    targets = np.array([[2, IGNORE_INDEX, 1, IGNORE_INDEX], [0, 3, IGNORE_INDEX, 4]])
    assert grad_errors(model, ids, targets, ignore_index=IGNORE_INDEX) == {}
    # the loss is the mean over the kept rows only
    logits = np.asarray(model.forward(ids)).reshape(-1, 5)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    kept = targets.reshape(-1) != IGNORE_INDEX
    expected = -logp[kept, targets.reshape(-1)[kept]].mean()
    np.testing.assert_allclose(float(model.loss(ids, targets, ignore_index=IGNORE_INDEX)), expected, rtol=1e-12)
    # all ignored: zero loss and zero gradients, no division by zero
    loss, grads = model.loss_and_grads(ids, np.full_like(targets, IGNORE_INDEX), ignore_index=IGNORE_INDEX)
    assert float(loss) == 0.0 and all(not np.any(g) for g in grads.values())


def test_dropout_masks_are_reused_exactly_in_backward():
    """With dropout on, loss(params) under a fixed mask seed is a deterministic function
    whose finite differences match the analytic gradient only if backward applies the
    very masks the forward drew (embeddings, attention probabilities, both residuals)."""
    cfg = GPTConfig(vocab_size=6, n_ctx=3, n_embd=4, n_head=2, n_layer=1, dropout=0.4)
    model = random_model(cfg, 5)
    ids, targets = np.array([[1, 2, 1], [0, 5, 3]]), np.array([[2, 1, 0], [5, 3, 4]])
    assert grad_errors(model, ids, targets, dropout_seed=11) == {}
    # and the masks do something: other seeds give other losses, no rng gives no dropout
    losses = {float(model.loss_and_grads(ids, targets, rng=np.random.default_rng(s))[0]) for s in range(4)}
    assert len(losses) == 4
    # (to round-off: the training step may score the batch whole, the evaluation in pieces)
    np.testing.assert_allclose(float(model.loss_and_grads(ids, targets)[0]), float(model.loss(ids, targets)), rtol=1e-14)


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_wrong_embedding_backward_fails_the_check(monkeypatch, kernels):
    """Negative control: `dW[ids] += dY` (NumPy keeps one write per repeated id or position)."""
    cfg = GPTConfig(vocab_size=4, n_ctx=4, n_embd=4, n_head=2, n_layer=1)
    model = random_model(cfg, 7)
    if kernels == "reference":
        model = GPT.from_numpy(cfg, model.to_numpy(), NumpyBackend(REFERENCE))
    ids = np.array([[1, 1, 2, 1], [3, 1, 0, 2]])  # id 1 repeats
    targets = np.array([[1, 2, 1, 3], [1, 0, 2, 2]])
    assert grad_errors(model, ids, targets) == {}  # the real backward passes

    def assigning_index_add(target, ids, values):
        target[ids] += values  # buffered: repeated ids collect one value, not the sum
        return target

    monkeypatch.setattr(model.backend, "index_add", assigning_index_add)
    monkeypatch.setattr(numpy_fast, "add_rows", assigning_index_add)  # the fast set's own scatter-add
    failures = grad_errors(model, ids, targets)
    # wpe's scatter-add too in the reference (each position repeats once per row); NumPy's
    # fast set sums wpe's gradient over the batch instead
    reference = model.backend.kernels is REFERENCE  # (NPGPT_KERNELS=reference makes "fast" the reference too)
    assert set(failures) == ({"wte.weight", "wpe.weight"} if reference else {"wte.weight"}), failures


@settings(max_examples=5, deadline=None)
@given(first=st.integers(2, 4), rest=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_packed_documents_gradients_match_finite_differences(first, rest, seed):
    """With segments (two documents per row) the backward is still the loss's gradient."""
    T = first + rest
    cfg = GPTConfig(vocab_size=5, n_ctx=T, n_embd=4, n_head=2, n_layer=1)
    model = random_model(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    ids, targets = rng.integers(0, 5, (2, T)), rng.integers(0, 5, (2, T))
    segments = np.array([[0] * first + [1] * rest, [3] * rest + [4] * first])
    assert grad_errors(model, ids, targets, segments=segments) == {}


def test_grad_ready_reports_each_parameter_once_in_order_with_its_final_value():
    cfg = GPTConfig(vocab_size=7, n_ctx=6, n_embd=4, n_head=2, n_layer=3)
    model = random_model(cfg, 3)
    ids = np.array([[1, 2, 3, 1, 5], [0, 6, 6, 2, 1]])
    calls = []
    _, grads = model.loss_and_grads(ids, ids, grad_ready=lambda names, g: calls.append({n: g[n].copy() for n in names}))
    block = lambda i: [n for n in param_shapes(cfg) if n.startswith(f"h.{i}.")]  # noqa: E731
    expected = [["ln_f.weight", "ln_f.bias"], *(block(i) for i in (2, 1, 0)), ["wte.weight", "wpe.weight"]]
    assert [list(call) for call in calls] == expected
    assert sorted(n for call in calls for n in call) == sorted(grads)
    for call in calls:
        for name, value in call.items():
            np.testing.assert_array_equal(value, grads[name], err_msg=name)


def arrays_in(cache) -> list[np.ndarray]:
    """The arrays an activation cache holds, in its tuples, lists and dataclasses."""
    if isinstance(cache, np.ndarray):
        return [cache]
    if isinstance(cache, (tuple, list)):
        return [a for part in cache for a in arrays_in(part)]
    if dataclasses.is_dataclass(cache):
        return [a for f in dataclasses.fields(cache) for a in arrays_in(getattr(cache, f.name))]
    return []


@pytest.mark.parametrize("kernels, n_threads", [("reference", 1), ("fast", 1), ("fast", 2)])
def test_the_backward_frees_each_blocks_activations_once_read(monkeypatch, restore_threads, kernels, n_threads):
    """The backward lets go of what it has read: when a block's attention backward starts,
    no array of its MLP branch's caches is left anywhere, and when block i-1's backward
    starts, none of block i's (parameters aside). So a step's peak holds the activations
    and one block's gradients, not the activations and every gradient. At 2 threads the
    batch runs as two pieces, each on its own thread."""
    cfg = GPTConfig(vocab_size=11, n_ctx=128, n_embd=16, n_head=2, n_layer=3)
    params = {k: v.astype(np.float32) for k, v in random_model(cfg, 5).to_numpy().items()}
    chosen = REFERENCE if kernels == "reference" else numpy_fast.KERNELS
    watched, leaks, calls = {}, [], []  # watched: (a piece's thread, "block"|"mlp") -> weak references

    def watch(what, caches):
        watched[threading.get_ident(), what] = [weakref.ref(a) for c in caches for a in arrays_in(c) if id(a) not in parameters]
        return len(watched[threading.get_ident(), what])

    def check(what, where):
        leaks.extend(f"{where}: {r().shape}" for r in watched.get((threading.get_ident(), what), []) if r() is not None)

    def attention_backward(dy, cache):
        check("mlp", "the MLP branch's caches at the attention backward")
        return chosen.attention_backward(dy, cache)

    spied = chosen.replace("spied", attention_forward=chosen.attention_forward, attention_backward=attention_backward)
    model = GPT.from_numpy(cfg, params, NumpyBackend(spied))
    parameters = {id(p) for p in model.params.values()}
    block_backward = GPT._block_backward

    def spy(self, i, dx, B, act, grads):
        check("block", f"block {i + 1} at block {i}'s backward")
        calls.append((threading.get_ident(), watch("block", [act]), watch("mlp", [act.ln_2, act.c_fc, act.gelu, act.mlp_c_proj])))
        return block_backward(self, i, dx, B, act, grads)

    monkeypatch.setattr(GPT, "_block_backward", spy)
    threads.set_num_threads(n_threads)
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, 11, (2, 128)), rng.integers(0, 11, (2, 128))
    model.loss_and_grads(ids, targets)
    assert len({me for me, _, _ in calls}) == n_threads  # one piece per thread
    assert len(calls) == cfg.n_layer * n_threads and all(b >= 5 and m >= 3 for _, b, m in calls)  # arrays watched
    assert leaks == []

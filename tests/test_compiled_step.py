"""The compiled decode step (`npgpt.kernels.compiled_step`, where numba is installed) equals
the reference: its product alone, W held either way, over 1-3 threads, against x @ W + b in
float64 (Hypothesis); a float32 model's cached decoding through it (each step in one call,
from the token to its logits; a prompt's one-row products on the same product) against the
reference model in float64 on the same weights, row-major and column-major, over 1-3
threads, to the context's last position (Hypothesis); and where its threads give up
waiting for each other, a warning and the step op by op, with the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

numba = pytest.importorskip("numba")

import npgpt.kernels.numpy_fast as fast  # noqa: E402
from npgpt import layers  # noqa: E402
from npgpt.backend import NumpyBackend  # noqa: E402
from npgpt.config import GPTConfig  # noqa: E402
from npgpt.kernels import REFERENCE, threads  # noqa: E402
from npgpt.kernels import compiled_step as step  # noqa: E402
from npgpt.model import GPT  # noqa: E402

from test_gradients import random_model  # noqa: E402
from test_kernels import blocks  # noqa: E402


def rows_of(rng, shape, scale):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# -- one product -----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(Cin=st.integers(1, 40), Cout=st.integers(1, 70), transposed=st.booleans(), n_threads=st.integers(1, 3),
       gelu=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
@example(Cin=19, Cout=37, transposed=False, n_threads=3, gelu=True, seed=0)  # ranges of 7, 6, 6 rows; 16, 16, 5 outputs
@example(Cin=3, Cout=2, transposed=True, n_threads=3, gelu=False, seed=1)  # threads with no rows or outputs of their own
def test_a_product_equals_x_times_w_plus_b(Cin, Cout, transposed, n_threads, gelu, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rows_of(rng, Cin, 1.0), rows_of(rng, (Cin, Cout), 1.0), rows_of(rng, Cout, 1.0)
    held = np.ascontiguousarray(w.T) if transposed else w
    y, partial, flags = np.full(Cout, np.nan, np.float32), np.empty((n_threads, Cout), np.float32), step.new_flags(n_threads)
    done = threads.at_once(lambda tid: step.product(x, held, transposed, b, y, gelu, partial, tid, n_threads, flags, 0), n_threads)
    assert done == [1 if transposed else 2] * n_threads  # the barriers each thread passed
    ref = x.astype(np.float64) @ w.astype(np.float64) + b
    ref = layers.gelu_forward(ref)[0] if gelu else ref
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.sqrt(Cin))


def test_a_thread_that_never_comes_makes_the_others_give_up(monkeypatch):
    monkeypatch.setattr(step, "GIVE_UP_YIELDS", 1000)
    flags = step.new_flags(2)
    assert not step.barrier(flags, 0, 2, 1)  # thread 1 never reaches barrier 1
    assert flags[2 * step.LANE] == 1  # the give-up mark: thread 1, late, passes barrier 1 (both reached it)
    assert step.barrier(flags, 1, 2, 1) and not step.barrier(flags, 1, 2, 2)  # and stops at once at the next
    assert step.barrier(step.new_flags(1), 0, 1, 1)  # a thread alone never waits


# -- cached decoding through the model -------------------------------------------------------------
def decoded(model, ids, prompt):
    """Logits (steps + 1, V) of a prompt of `prompt` ids, then of each later id one cached
    step at a time, and the cache."""
    cache = model.new_cache(1)
    logits = [model.forward(ids[:, :prompt], cache, last_only=True)[0, -1]]
    for t in range(prompt, ids.shape[1]):
        logits.append(model.forward(ids[:, t : t + 1], cache, last_only=True)[0, -1])
    return np.stack(logits), cache


class Spy:
    """Counts what `decode_step` and the one-row product returned (results, Nones)."""

    def __init__(self, monkeypatch):
        self.steps, self.products = [], []
        decode_step, product = fast.decode_step, fast.one_row_product

        def spy_step(*args):
            self.steps.append(out := decode_step(*args))
            return out

        def spy_product(*args):
            self.products.append(out := product(*args))
            return out

        monkeypatch.setattr(fast, "one_row_product", spy_product)
        monkeypatch.setattr(fast, "KERNELS", fast.KERNELS.replace("spied", decode_step=spy_step))


def float32_model(reference: GPT, column_major: set, spy_kernels) -> GPT:
    """The reference's weights in float32 on NumPy's fast kernels (through the spy), the
    `column_major` kinds of weight (and "wte") in column-major order."""
    params = {}
    for name, value in reference.params.items():
        kind = name.split(".", 2)[-1].removesuffix(".weight") if name.startswith("h.") else name.removesuffix(".weight")
        order = "F" if kind in column_major and value.ndim == 2 else "C"
        params[name] = np.array(value, dtype=np.float32, order=order)
    return GPT(reference.config, params, NumpyBackend(spy_kernels))


@settings(max_examples=12, deadline=None)
@given(n_layer=st.integers(1, 2), n_head=st.integers(1, 3), hs=st.sampled_from([1, 5, 16]), prompt=st.integers(1, 9),
       steps=st.integers(1, 5), n_threads=st.integers(1, 3),
       column_major=st.sets(st.sampled_from(fast.STEP_WEIGHTS + ("wte",))), seed=st.integers(0, 2**16))  # fmt: skip
@example(n_layer=2, n_head=3, hs=16, prompt=9, steps=5, n_threads=2, column_major={"attn.c_proj", "mlp.c_proj", "wte"}, seed=0)
def test_cached_decoding_through_the_compiled_step_equals_the_reference(n_layer, n_head, hs, prompt, steps, n_threads,
                                                                        column_major, seed):  # fmt: skip
    """Each step's logits and the cache's keys and values, to the last position of the
    context (n_ctx = prompt + steps), against the reference in float64."""
    cfg = GPTConfig(vocab_size=41, n_ctx=prompt + steps, n_embd=n_head * hs, n_head=n_head, n_layer=n_layer)
    reference = random_model(cfg, seed)
    reference = GPT(cfg, reference.params, NumpyBackend(REFERENCE))
    with pytest.MonkeyPatch.context() as patch:
        spy = Spy(patch)
        model = float32_model(reference, column_major, fast.KERNELS)
        ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, cfg.n_ctx))
        with blocks(n_threads=n_threads):
            logits, cache = decoded(model, ids, prompt)
    ref_logits, ref_cache = decoded(reference, ids, prompt)
    assert len(spy.steps) == steps + 1 and (spy.steps[0] is None) == (prompt > 1)  # a prompt of one id is a step too
    assert all(out is not None for out in spy.steps[1:])  # every later step in one compiled call
    # a longer prompt's last block takes its last position alone: three one-row products and the LM head's
    assert len(spy.products) == (4 if prompt > 1 else 0) and all(out is not None for out in spy.products)
    scale = np.abs(ref_logits).max()
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * scale)
    for got, ref in ((cache.keys, ref_cache.keys), (cache.values, ref_cache.values)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_threads_that_give_up_leave_the_step_op_by_op_with_a_warning(monkeypatch):
    """A thread that never starts (at_once running thread 0 alone): thread 0 gives up after
    GIVE_UP_YIELDS, the model runs the step op by op and each one-row product on BLAS, same
    numbers."""
    cfg = GPTConfig(vocab_size=41, n_ctx=8, n_embd=12, n_head=2, n_layer=2)
    reference = GPT(cfg, random_model(cfg, 5).params, NumpyBackend(REFERENCE))
    spy = Spy(monkeypatch)
    model = float32_model(reference, set(), fast.KERNELS)
    monkeypatch.setattr(step, "GIVE_UP_YIELDS", 1000)
    monkeypatch.setattr(fast.threads, "at_once", lambda work, n: [work(0)] + [0] * (n - 1))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8))
    with blocks(n_threads=2), pytest.warns(RuntimeWarning, match="threads gave up waiting") as caught:
        logits, cache = decoded(model, ids, 4)
    assert {str(w.message).rsplit("; ", 1)[1] for w in caught} == {"the step runs op by op", "the product runs on BLAS"}
    assert spy.steps == [None] * 5  # the prompt (4 ids: no step) and the 4 steps
    assert spy.products == [None] * (4 + 4 * (2 * 4 + 1))  # the prompt's last block and head, then each step's 2 blocks and head
    ref_logits, _ = decoded(reference, ids, 4)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())


def test_what_the_compiled_step_does_not_take_runs_one_by_one(monkeypatch):
    """A batch of two, a kind of weight with mixed layouts, float64, an id out of range: no
    compiled step (None)."""
    cfg = GPTConfig(vocab_size=41, n_ctx=8, n_embd=12, n_head=2, n_layer=2)
    reference = GPT(cfg, random_model(cfg, 6).params, NumpyBackend(REFERENCE))
    spy = Spy(monkeypatch)
    model = float32_model(reference, set(), fast.KERNELS)
    model.params["h.1.mlp.c_fc.weight"] = np.asfortranarray(model.params["h.1.mlp.c_fc.weight"])  # block 0's is row-major
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8))
    cache = model.new_cache(2)
    model.forward(ids[:, :4], cache)
    model.forward(ids[:, 4:5], cache)  # two rows
    one = model.new_cache(1)
    model.forward(ids[:1, :4], one)
    model.forward(ids[:1, 4:5], one)  # mixed layouts
    assert spy.steps == [None] * 4  # (two prompts too)
    assert fast.decode_step(reference.params, cfg, np.zeros((1, 1), np.int64), reference.new_cache(1)) is None  # float64
    model.params["h.1.mlp.c_fc.weight"] = np.ascontiguousarray(model.params["h.1.mlp.c_fc.weight"])
    assert fast.decode_step(model.params, cfg, np.array([[41]]), model.new_cache(1)) is None  # V = 41
    assert fast.decode_step(model.params, cfg, np.array([[40]]), model.new_cache(1)) is not None


def test_a_thread_stopped_by_an_exception_releases_the_others(monkeypatch):
    """Ctrl-C in the calling thread before its compiled part began: it sets the give-up
    mark on its way out, so the thread waiting for it at a barrier stops, and the
    KeyboardInterrupt goes on."""
    marks, waited = [], []
    give_up = step.give_up
    monkeypatch.setattr(step, "give_up", lambda flags, nt: (marks.append(nt), give_up(flags, nt)))
    flags = step.new_flags(2)

    def work(tid):
        if tid == 0:
            raise KeyboardInterrupt
        waited.append(step.barrier(flags, 1, 2, 1))
        return 0

    with pytest.raises(KeyboardInterrupt):
        fast.together(step, work, 2, flags, "nothing")
    assert marks == [2] and waited == [False]


def test_a_first_compile_is_announced_once():
    """The generate CLI's notice: said once, when numba compiles (a cold cache), not per function."""
    from numba.core import event

    said = []
    listener = fast.announce_compiling(said.append)
    try:
        assert said == []  # nothing compiled yet
        for n in (1, 2):
            numba.njit(cache=False)(lambda x, n=n: x + n)(1)  # two fresh compiles
    finally:
        event.unregister("numba:compile", listener)
    assert len(said) == 1 and said[0].startswith("notice: numba is compiling")

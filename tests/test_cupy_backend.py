"""The CuPy plugin (backends/cupy, module npgpt_cupy), run on tests/fake_cupy.py: NumPy
standing in for a GPU, with CuPy's refusals (no implicit conversion to NumPy, no NumPy
operands, one device at a time) and every host<->device copy counted.

On a machine with a GPU, `NPGPT_TEST_BACKENDS=numpy,cupy pytest` runs the engine,
training and generation tests on the real thing; these tests pin down what the fake can:
errors, transfers per token, device placement, agreement with NumPy.
"""

from __future__ import annotations

import importlib.metadata

import fake_cupy
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npgpt.backend as backend_module
import npgpt_cupy
from npgpt.backend import BackendError, NumpyBackend, get_backend
from npgpt.config import GPTConfig
from npgpt.errors import UserError
from npgpt.generate import generate_ids
from npgpt.kernels import REFERENCE
from npgpt.model import GPT, init_params
from npgpt.optim import AdamW, clip_grad_norm
from npgpt.sampling import SamplingConfig

TINY = GPTConfig(vocab_size=61, n_ctx=24, n_embd=16, n_head=4, n_layer=2)
N_PARAMS = 4 + 12 * TINY.n_layer


@pytest.fixture
def fake(monkeypatch):
    """`import cupy` gives the fake for this test; yields its module (fresh counters)."""
    yield fake_cupy.install(monkeypatch)["cupy"]
    fake_cupy.reset()


def transfers_during(action):
    before = fake_cupy.STATE.transfers.snapshot()
    result = action()
    return result, fake_cupy.STATE.transfers.snapshot() - before


# -- selecting the backend --------------------------------------------------------------------
def test_the_plugin_is_registered_under_npgpt_backends():
    entries = importlib.metadata.entry_points(group=backend_module.ENTRY_POINT_GROUP)
    assert {(e.name, e.value) for e in entries} >= {("cupy", "npgpt_cupy:make_backend")}


def test_without_cupy_the_message_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "cupy", None)  # `import cupy` fails
    with pytest.raises(BackendError, match=r'CuPy is not installed.*pip install "npgpt\[cupy13\]".*"npgpt\[cupy\]"'):
        get_backend("cupy")


def test_without_a_gpu_the_message_says_to_check_the_driver(monkeypatch):
    fake_cupy.install(monkeypatch, device_count=0)
    with pytest.raises(BackendError, match=r"CuPy is installed but cannot reach a GPU.*nvidia-smi"):
        get_backend("cupy")


def test_cupy_13_is_refused_with_the_upgrade_command(fake, monkeypatch):
    monkeypatch.delattr(fake_cupy.ndarray, "mT")
    with pytest.raises(BackendError, match=r"CuPy 14 or newer.*pip install -U"):
        get_backend("cupy")


@pytest.mark.parametrize(("spec", "message"), [("cupy:2", r"no GPU 2: CuPy sees 2 GPU\(s\)"), ("cupy:gpu", "GPU number")])
def test_bad_device_names_are_clear_errors(fake, spec, message):
    with pytest.raises(BackendError, match=message):
        get_backend(spec)


def test_the_same_entry_point_registered_twice_is_fine(fake, monkeypatch):
    """`npgpt[cupy]` and `npgpt-cupy` both register cupy = npgpt_cupy:make_backend."""
    twice = [importlib.metadata.EntryPoint("cupy", "npgpt_cupy:make_backend", backend_module.ENTRY_POINT_GROUP)] * 2
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: twice)
    assert get_backend("cupy").name == "cupy:0"


def test_found_from_a_checkout_with_no_entry_points(fake, monkeypatch):
    """PYTHONPATH=.:backends/cupy and nothing installed: "cupy" by its known import path,
    or any plugin as module:factory[:device]."""
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert "cupy" in backend_module.available_backends()
    assert get_backend("cupy").name == "cupy:0"
    assert get_backend("npgpt_cupy:make_backend:1").name == "cupy:1"


def test_not_listed_without_cupy(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "cupy", None)
    assert "cupy" not in backend_module.available_backends()


def test_tf32_is_refused_with_what_to_unset(fake, monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "1")
    with pytest.raises(BackendError, match=r"^CUPY_TF32=1 makes float32 matmuls TF32.*; to fix: unset CUPY_TF32"):
        get_backend("cupy")


def test_float16_is_checked_on_first_use_and_a_failure_says_what_to_install(fake, monkeypatch):
    """float16 kernels compile against CUDA's headers: a missing cuda_fp16.h is a
    BackendError naming the fix, not a compile log in the middle of a forward pass."""
    b = get_backend("cupy")
    tanh = fake.tanh

    def tanh_without_fp16_headers(x, *args, **kwargs):
        if x.dtype == np.float16:
            raise RuntimeError("catastrophic error: cannot open source file \"cuda_fp16.h\"\n1 catastrophic error detected")
        return tanh(x, *args, **kwargs)

    monkeypatch.setattr(fake, "tanh", tanh_without_fp16_headers)
    assert b.dtype("float32") == np.float32
    with pytest.raises(BackendError, match=r'^CuPy cannot run float16 kernels on GPU 0 \(RuntimeError: catastrophic error: cannot open source file "cuda_fp16.h"\); .*\[ctk\]') as e:
        GPT.init(TINY, backend=b, dtype="float16")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(fake, "tanh", tanh)
    assert GPT.init(TINY, backend=b, dtype="float16").dtype == np.float16


# -- the fake behaves like CuPy where it matters ---------------------------------------------------
def test_fake_arrays_refuse_implicit_host_conversion(fake):
    x = fake.asarray(np.ones(3))
    for implicit in (lambda: np.asarray(x), lambda: x + np.ones(3), lambda: np.ones(3) * x, lambda: np.exp(x)):
        with pytest.raises(TypeError):
            implicit()
    assert not hasattr(x, "__array_namespace__")
    with pytest.raises(TypeError, match="device"):
        fake.zeros(3, device=x.device)
    np.testing.assert_array_equal(x.get(), np.ones(3))
    assert fake_cupy.STATE.log == [("up", (3,)), ("down", (3,))]


# -- the backend's operations -------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 5), min_size=1, max_size=20), seed=st.integers(0, 10**6), rows=st.sampled_from([1, 3, 2048]))
def test_index_add_sums_repeated_ids_without_atomics(ids, seed, rows):
    """The deterministic segment sum (one-hot matmul over the distinct ids, `rows` rows at
    a time; plain indexing when no id repeats) equals np.add.at, into a non-zero target."""
    b = fake_cupy.make_backend()
    rng = np.random.default_rng(seed)
    values, start = rng.normal(size=(len(ids), 3)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)
    expected = start.copy()
    np.add.at(expected, np.array(ids), values)
    target = b.asarray(start)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(npgpt_cupy, "SEGMENT_ROWS", rows)
        got = b.index_add(target, b.asarray(np.array(ids)), b.asarray(values))
    assert got is target  # in place, as cupyx.scatter_add works
    np.testing.assert_allclose(b.to_numpy(got), expected, rtol=1e-6, atol=1e-6)


def test_index_add_uses_no_atomic_adds(fake, monkeypatch):
    """cupyx.scatter_add's atomics sum repeated ids in a varying order (a resumed run would
    differ in the last bits): index_add must not call it."""
    monkeypatch.setattr(fake_cupy, "scatter_add", lambda *a: pytest.fail("atomic scatter_add used"))
    monkeypatch.setitem(__import__("sys").modules["cupyx"].__dict__, "scatter_add", fake_cupy.scatter_add)
    b = get_backend("cupy")
    target = b.xp.zeros((4, 2), dtype=b.xp.float32, device=b.device)
    (got, moved) = transfers_during(lambda: b.index_add(target, b.asarray(np.array([1, 1, 3])), b.asarray(np.ones((3, 2)))))
    np.testing.assert_array_equal(b.to_numpy(got), [[0, 0], [2, 2], [0, 0], [1, 1]])
    assert moved.syncs == 1  # cupy.unique's


def test_an_out_of_range_id_on_the_device_is_an_error_at_the_next_read_back(fake):
    """CuPy's take wraps a bad index around; the plugin records it on the device (no
    transfer) and raises when data is read back."""
    model = GPT.init(TINY, backend="cupy", seed=0)
    b = model.backend
    bad_ids = b.asarray(np.array([[1, TINY.vocab_size]]))
    logits, moved = transfers_during(lambda: model.forward(bad_ids))
    assert (moved.downloads, moved.syncs) == (0, 0)
    with pytest.raises(IndexError, match=r"^an index outside its axis .* GPU 0, which CuPy wraps silently: a token id >= vocab_size") as e:
        b.to_numpy(logits)
    assert isinstance(e.value, UserError)  # a CLI reports it in one line
    b.to_numpy(model.forward(b.asarray(np.array([[1, 2]]))))  # the record was cleared: good ids pass
    targets = np.array([[3, -100]])  # Hugging Face's ignore label, with the ignore index left at -1
    loss, _ = model.loss_and_grads(b.asarray(np.array([[1, 2]])), b.asarray(targets), ignore_index=-1)
    with pytest.raises(IndexError, match="nor the ignore index"):
        b.synchronize()
    loss, _ = model.loss_and_grads(b.asarray(np.array([[1, 2]])), b.asarray(targets), ignore_index=-100)
    assert np.isfinite(b.to_numpy(loss))


def test_synchronize_waits_on_the_stream_and_memory_is_the_pool_high_water_mark(fake):
    b = get_backend("cupy")
    _, moved = transfers_during(b.synchronize)
    assert moved.syncs == 1
    x = b.xp.zeros((1000,), dtype=b.xp.float32, device=b.device)
    del x
    assert b.peak_memory_bytes() >= 4000


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_uniform_is_drawn_on_the_device_seeded_by_the_host_generator(fake, dtype):
    """Dropout's draws: no upload; one host draw seeds the device generator, so the same
    host state gives the same samples and the host stream moves on by exactly one draw."""
    b = get_backend("cupy")
    rng, device_dtype = np.random.default_rng(3), b.dtype(dtype)  # (float16's first use runs its check)
    got, moved = transfers_during(lambda: b.uniform(rng, (4000, 5), device_dtype))
    assert (moved.uploads, moved.downloads) == (0, 0) and got.dtype == np.dtype(dtype)
    host = b.to_numpy(got)
    assert 0 <= host.min() and host.max() < 1 and abs(host.mean() - 0.5) < 0.05
    again = np.random.default_rng(3)
    np.testing.assert_array_equal(b.to_numpy(b.uniform(again, (4000, 5), b.dtype(dtype))), host)
    expected_next = np.random.default_rng(3)
    expected_next.integers(2**63)
    assert rng.random() == expected_next.random()


# -- the engine on the plugin ---------------------------------------------------------------------
def test_weights_are_uploaded_once_each_on_load(fake, tmp_path):
    path = tmp_path / "model.safetensors"
    GPT.init(TINY, seed=1).save(path)
    gpu = get_backend("cupy")  # (its start-up check moves a few bytes: not counted here)
    model, moved = transfers_during(lambda: GPT.load(path, backend=gpu))
    assert (moved.uploads, moved.downloads) == (N_PARAMS, 0)
    assert moved.upload_bytes == sum(v.nbytes for v in init_params(TINY, 1).values())
    reference = GPT.load(path)
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_allclose(model.backend.to_numpy(model.forward(ids)), reference.forward(ids), atol=1e-5)


def test_generation_moves_one_id_up_and_one_row_of_logits_down_per_token(fake):
    model = GPT.init(TINY, backend="cupy", seed=2)
    prompt, n_new = [5, 9, 2], 6
    fake_cupy.STATE.log.clear()
    ids, moved = transfers_during(lambda: list(generate_ids(model, prompt, n_new, SamplingConfig(), np.random.default_rng(0))))
    # each read-back of logits also reads the one bool that says whether an id was out of range
    expected_log = [("up", (1, len(prompt))), ("down", (TINY.vocab_size,)), ("down", ())]  # prefill
    expected_log += [("up", (1, 1)), ("down", (TINY.vocab_size,)), ("down", ())] * (n_new - 1)  # each further token
    assert fake_cupy.STATE.log == expected_log
    assert moved.upload_bytes == 8 * (len(prompt) + n_new - 1)  # int64 ids only
    assert moved.syncs == 0
    reference = GPT.init(TINY, seed=2)
    assert ids == list(generate_ids(reference, prompt, n_new, SamplingConfig(), np.random.default_rng(0)))


def test_device_selection_keeps_every_array_on_that_gpu(fake):
    """On cupy:1 the model runs with GPU 1 current; the fake raises, as CuPy does, when an
    array of one GPU is used while another is current."""
    model = GPT.init(TINY, backend="cupy:1", seed=0)
    assert model.backend.device.id == 1 and {p.device.id for p in model.params.values()} == {1}
    cache = model.new_cache(1)
    logits = model.forward(np.array([[1, 2, 3]]), cache)
    assert logits.device.id == 1 and cache.k[0].device.id == 1
    with fake.cuda.Device(0), pytest.raises(ValueError, match="different from the current device"):
        model.forward(np.array([[4]]), cache)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_training_step_matches_numpy_and_never_reads_back(fake, dropout):
    """loss_and_grads, clipping and AdamW on the device: only the batch goes up (dropout
    masks are drawn on the device); nothing comes down until the loss is logged. Without
    dropout the step equals NumPy's; with it (other masks) it repeats itself exactly."""
    config = GPTConfig(**{**TINY.__dict__, "dropout": dropout}) if dropout else TINY
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, TINY.vocab_size, (2, 8)), rng.integers(0, TINY.vocab_size, (2, 8))

    def step(backend):
        model = GPT.init(config, backend=backend, seed=4)
        optimizer = AdamW(model.params, model.backend)

        def train_step():
            loss, grads = model.loss_and_grads(ids, targets, rng=np.random.default_rng(7))
            clip_grad_norm(grads, 1.0, model.backend)
            optimizer.step(grads, lr=1e-2)
            return loss, grads

        (loss, grads), moved = transfers_during(train_step)
        return model, loss, grads, moved

    model, loss, grads, moved = step("cupy")
    assert moved.downloads == 0 and moved.syncs == 2  # cupy.unique in the two index_adds
    assert moved.uploads == 2  # ids and targets
    if dropout:
        again, again_loss, _, _ = step("cupy")
        assert float(loss) == float(again_loss) != float(step("numpy")[1])
        for name, value in model.to_numpy().items():
            np.testing.assert_array_equal(value, again.to_numpy()[name], err_msg=name)
        return
    # NumPy with the same (reference) kernels: AdamW's first step, ~lr * sign(grad), would
    # magnify the float32 rounding of the fast kernels on gradients near zero
    reference, ref_loss, ref_grads, _ = step(NumpyBackend(REFERENCE))
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for name, value in model.to_numpy().items():
        np.testing.assert_allclose(value, reference.params[name], atol=1e-5, err_msg=name)
    for name in grads:
        np.testing.assert_allclose(model.backend.to_numpy(grads[name]), ref_grads[name], atol=1e-5, err_msg=name)


def test_fake_cupy_is_a_whole_suite_backend():
    """NPGPT_TEST_BACKENDS=numpy,fake-cupy runs the backend-parametrised tests on the plugin."""
    b = get_backend("fake-cupy")
    assert b.name == "fake-cupy:0" and b.holds(b.asarray(np.ones(2))) and not b.holds(np.ones(2))

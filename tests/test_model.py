"""Properties of GPT-2's forward pass: causality, KV-cache equivalence, batch invariance,
portability across backends, and clear errors for bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npgpt.kernels.numpy_fast as fast
from npgpt.backend import get_backend
from npgpt.config import GPTConfig
from npgpt.model import GPT, init_params, param_shapes

TINY = GPTConfig(vocab_size=37, n_ctx=24, n_embd=16, n_head=4, n_layer=2)
TOL = {"float32": 1e-5, "float64": 1e-10}


def tiny_model(backend="numpy", dtype="float32", config=TINY, seed=0):
    """A tiny model whose biases and gains are random too, so no term hides behind a 0 or 1."""
    params = init_params(config, seed=seed, dtype="float64")
    rng = np.random.default_rng(seed + 1)
    params = {k: (v + rng.normal(0, 0.1, v.shape)).astype(dtype) for k, v in params.items()}
    return GPT.from_numpy(config, params, backend)


def host(model, x):
    return model.backend.to_numpy(x)


ids_strategy = st.integers(1, 3).flatmap(
    lambda B: st.integers(2, TINY.n_ctx).flatmap(
        lambda T: st.lists(st.integers(0, TINY.vocab_size - 1), min_size=B * T, max_size=B * T).map(
            lambda xs: np.array(xs).reshape(B, T)
        )
    )
)


@pytest.fixture(scope="module")
def model32():
    return tiny_model(dtype="float32")


@pytest.fixture(scope="module")
def model64():
    return tiny_model(dtype="float64")


@settings(max_examples=30, deadline=None)
@given(ids=ids_strategy, data=st.data())
def test_causality(model64, ids, data):
    """Changing tokens after position t never changes the logits at positions <= t."""
    t = data.draw(st.integers(0, ids.shape[1] - 2))
    changed = ids.copy()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % TINY.vocab_size
    a, b = model64.forward(ids), model64.forward(changed)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the change did reach later positions


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@settings(max_examples=25, deadline=None)
@given(ids=ids_strategy, data=st.data())
def test_kv_cache_equals_full_forward(dtype, ids, data):
    """Feeding any split of a sequence chunk by chunk through the cache equals one forward."""
    model = tiny_model(dtype=dtype)
    T = ids.shape[1]
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=4)))
    cache = model.new_cache(ids.shape[0])
    chunks = [model.forward(ids[:, a:b], cache) for a, b in zip([0, *cuts], [*cuts, T])]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), model.forward(ids), rtol=0, atol=TOL[dtype])
    assert cache.length == T


@settings(max_examples=20, deadline=None)
@given(ids=ids_strategy)
def test_batch_invariance(model32, ids):
    """A row computed in a batch equals the same row computed alone."""
    batch = model32.forward(ids)
    for b in range(ids.shape[0]):
        np.testing.assert_allclose(batch[b : b + 1], model32.forward(ids[b : b + 1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("block", [1, 3, 5])
def test_query_blocks_do_not_change_attention(model64, monkeypatch, block):
    """Splitting the queries into blocks (to skip masked keys) is exact reorganisation."""
    ids = np.arange(2 * 17).reshape(2, 17) % TINY.vocab_size
    expected = model64.forward(ids)
    monkeypatch.setattr(fast, "QUERY_BLOCK", block)
    np.testing.assert_allclose(model64.forward(ids), expected, rtol=0, atol=1e-12)
    loss, grads = model64.loss_and_grads(ids, ids)
    monkeypatch.setattr(fast, "QUERY_BLOCK", 128)
    loss_ref, grads_ref = model64.loss_and_grads(ids, ids)
    assert abs(float(loss) - float(loss_ref)) < 1e-12
    for name in grads:
        np.testing.assert_allclose(grads[name], grads_ref[name], rtol=0, atol=1e-12, err_msg=name)


def test_last_only_is_the_last_row(model32):
    """To rounding: the last block runs each row's last query alone, and a piece of one row takes BLAS's matrix-vector path for the LM head."""
    ids = np.arange(3 * 11).reshape(3, 11) % TINY.vocab_size
    full = model32.forward(ids)
    np.testing.assert_allclose(model32.forward(ids, last_only=True), full[:, -1:], rtol=0, atol=1e-6)
    cache = model32.new_cache(3)
    model32.forward(ids[:, :6], cache)
    np.testing.assert_allclose(model32.forward(ids[:, 6:], cache, last_only=True), full[:, -1:], atol=1e-5)


@pytest.mark.needs_array_api_strict
@pytest.mark.parametrize("device", ["CPU_DEVICE", "device1", "no_float64"])
def test_array_api_strict_matches_numpy(device, monkeypatch):
    """The engine uses only portable array operations: array-api-strict (which refuses
    hidden host conversion, float64 on no_float64, and slices past an array's end) gives
    NumPy's results. Small blocks make the query and row loops end on partial blocks."""
    monkeypatch.setattr(fast, "QUERY_BLOCK", 4)
    monkeypatch.setattr(fast, "ROW_BLOCK", 5)
    ids = np.arange(2 * 13).reshape(2, 13) % TINY.vocab_size
    reference = tiny_model("numpy")
    strict = tiny_model(f"array-api-strict:{device}")
    np.testing.assert_allclose(host(strict, strict.forward(ids)), reference.forward(ids), rtol=0, atol=1e-6)
    cache = strict.new_cache(2)
    strict.forward(ids[:, :4], cache)
    step = strict.forward(ids[:, 4:], cache, last_only=True)
    np.testing.assert_allclose(host(strict, step), reference.forward(ids)[:, -1:], rtol=0, atol=1e-5)
    loss, grads = strict.loss_and_grads(ids, ids)
    loss_ref, grads_ref = reference.loss_and_grads(ids, ids)
    assert abs(float(host(strict, loss)) - float(loss_ref)) < 1e-6
    for name in grads:
        np.testing.assert_allclose(host(strict, grads[name]), grads_ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_same_logits_on_every_test_backend(backend):
    ids = np.arange(2 * 9).reshape(2, 9) % TINY.vocab_size
    model = tiny_model(backend)
    np.testing.assert_allclose(host(model, model.forward(ids)), tiny_model().forward(ids), rtol=0, atol=1e-5)


def test_init_is_gpt2s_and_reproducible():
    cfg = GPTConfig(vocab_size=500, n_ctx=64, n_embd=64, n_head=4, n_layer=6)
    a, b = init_params(cfg, seed=7), init_params(cfg, seed=7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["wte.weight"], init_params(cfg, seed=8)["wte.weight"])
    assert list(a) == list(param_shapes(cfg)) and all(v.dtype == np.float32 for v in a.values())
    assert abs(a["wte.weight"].std() - 0.02) < 1e-3
    assert abs(a["h.0.mlp.c_fc.weight"].std() - 0.02) < 1e-3
    assert abs(a["h.0.attn.c_proj.weight"].std() - 0.02 / np.sqrt(2 * 6)) < 5e-4
    assert np.all(a["h.3.ln_2.weight"] == 1) and np.all(a["h.3.mlp.c_fc.bias"] == 0)


def test_presets():
    cfg = GPTConfig.preset("124M")
    n = sum(np.prod(s) for s in param_shapes(cfg).values())
    assert n == 124_439_808  # GPT-2 small, with the LM head tied
    assert GPTConfig.preset("gpt2-xl").n_embd == 1600
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.array([1, 2, 3]), r"\(B, T\)"),
        (np.zeros((1, 0), dtype=int), r"\(B, T\)"),
        (np.array([[0.5, 1.0]]), "integers"),
        (np.array([[1, TINY.vocab_size]]), r"token ids must be in \[0, 37\)"),
        (np.array([[-1, 2]]), "token ids must be in"),
        (np.zeros((1, TINY.n_ctx + 1), dtype=int), "exceed the context of 24"),
    ],
)
def test_bad_ids_are_clear_errors(model32, ids, message):
    with pytest.raises(ValueError, match=message):
        model32.forward(ids)


def test_cache_overflow_and_batch_mismatch(model32):
    cache = model32.new_cache(1)
    model32.forward(np.zeros((1, 20), dtype=int), cache)
    with pytest.raises(ValueError, match="the cache holds 20 tokens; 25 tokens exceed the context of 24"):
        model32.forward(np.zeros((1, 5), dtype=int), cache)
    assert cache.length == 20  # a refused call changes nothing
    with pytest.raises(ValueError, match="batch size 1"):
        model32.forward(np.zeros((2, 1), dtype=int), cache)


def test_bad_params_are_clear_errors():
    params = init_params(TINY)
    wrong = dict(params, **{"h.1.mlp.c_fc.weight": np.zeros((16, 63), np.float32)})
    with pytest.raises(ValueError, match=r"'h.1.mlp.c_fc.weight' has shape \(16, 63\), the config needs \(16, 64\)"):
        GPT.from_numpy(TINY, wrong)
    with pytest.raises(ValueError, match="missing"):
        GPT.from_numpy(TINY, {k: v for k, v in params.items() if k != "ln_f.bias"})
    with pytest.raises(ValueError, match="one float dtype"):
        GPT.from_numpy(TINY, dict(params, **{"ln_f.bias": np.zeros(16, np.int32)}))


def test_float16_storage_computes_in_float32(tmp_path):
    params = {k: v.astype(np.float16) for k, v in init_params(TINY).items()}
    model = GPT.from_numpy(TINY, params, dtype="float32")
    assert model.dtype == np.float32
    logits16 = GPT.from_numpy(TINY, params).forward(np.array([[1, 2, 3]]))
    assert logits16.dtype == np.float16
    np.testing.assert_allclose(logits16, model.forward(np.array([[1, 2, 3]])), atol=2e-3)


def test_no_float64_leak_on_float32_models():
    """Every intermediate of a float32 model stays float32 (the no_float64 device would
    raise on any float64 array; this checks the NumPy path as well)."""
    model = tiny_model(get_backend("numpy"))
    ids = np.array([[3, 1, 4, 1, 5]])
    assert model.forward(ids).dtype == np.float32
    loss, grads = model.loss_and_grads(ids, ids)
    assert loss.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())


def test_targets_outside_the_vocabulary_are_refused_unless_ignored():
    """Hugging Face-style -100 labels must match the ignore index, not wrap around to V-100."""
    model = GPT.init(GPTConfig(vocab_size=50, n_ctx=4, n_embd=8, n_head=2, n_layer=1))
    ids = np.array([[1, 2, 3, 4]])
    for wrong in (-100, 50, -2):
        with pytest.raises(ValueError, match=r"targets must be ids in \[0, 50\)"):
            model.loss(ids, np.array([[1, 2, 3, wrong]]), ignore_index=-7)
        with pytest.raises(ValueError, match="ignore index"):
            model.loss_and_grads(ids, np.array([[1, 2, wrong, 3]]), ignore_index=-7)
    assert np.isfinite(float(model.loss(ids, np.array([[1, 2, 3, -100]]), ignore_index=-100)))

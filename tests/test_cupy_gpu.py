"""The CuPy plugin on a real NVIDIA GPU: what the NumPy double (tests/fake_cupy.py) cannot
show. Every test is marked `gpu`: it skips, with get_backend's reason, where CuPy cannot
reach a GPU (CI), and runs in `tools/gpu_check.sh` and any pytest on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from npgpt.backend import BackendError, get_backend
from npgpt.config import GPTConfig
from npgpt.model import GPT

pytestmark = pytest.mark.gpu
TINY = GPTConfig(vocab_size=61, n_ctx=24, n_embd=16, n_head=4, n_layer=2)


@pytest.fixture
def gpu():
    return get_backend("cupy")


def test_index_add_gives_the_same_bits_on_every_run(gpu):
    """The embedding backward's segment sum has no atomics: GPT-2-sized (V=50257, N=4096,
    Zipf-distributed ids, so many repeats) and bitwise repeatable."""
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.2, 4096), 50257) - 1
    values = rng.normal(size=(4096, 64)).astype(np.float32)
    expected = np.zeros((50257, 64), dtype=np.float32)
    np.add.at(expected, ids, values)
    runs = []
    for _ in range(3):
        target = gpu.xp.zeros((50257, 64), dtype=gpu.xp.float32, device=gpu.device)
        runs.append(gpu.to_numpy(gpu.index_add(target, gpu.asarray(ids), gpu.asarray(values))))
    assert all(np.array_equal(runs[0], run) for run in runs[1:])
    np.testing.assert_allclose(runs[0], expected, rtol=1e-5, atol=1e-5)


def test_an_out_of_range_id_raises_at_the_next_read_back(gpu):
    model = GPT.init(TINY, backend=gpu, seed=0)
    logits = model.forward(gpu.asarray(np.array([[1, TINY.vocab_size]])))
    with pytest.raises(IndexError, match="CuPy wraps silently"):
        gpu.to_numpy(logits)


@pytest.mark.parametrize(("dtype", "atol"), [("float16", 2e-2), ("float32", 1e-5), ("float64", 1e-12)])
def test_forward_matches_numpy_in_every_float_dtype(gpu, dtype, atol):
    """float16 compiles against CUDA's headers: the first float16 use checks them."""
    ids = np.arange(2 * 13).reshape(2, 13) % TINY.vocab_size
    reference = GPT.init(TINY, seed=3, dtype="float64").forward(ids)
    got = GPT.init(TINY, backend=gpu, seed=3, dtype=dtype).forward(ids)
    np.testing.assert_allclose(gpu.to_numpy(got).astype(np.float64), reference, atol=atol)


def test_tf32_is_refused(monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "1")
    with pytest.raises(BackendError, match="unset CUPY_TF32"):
        get_backend("cupy")


def test_dropout_draws_on_the_device_reproducibly(gpu):
    draws = [gpu.to_numpy(gpu.uniform(np.random.default_rng(5), (256, 64), gpu.dtype(d))) for d in ("float32", "float32", "float16")]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert all(0 <= d.min() and d.max() < 1 and abs(d.mean() - 0.5) < 0.01 for d in draws)
    assert draws[2].dtype == np.float16

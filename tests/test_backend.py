"""The backend registry and the operations the array API lacks."""

import importlib.metadata
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npgpt.backend as backend_module
from npgpt.backend import Backend, BackendError, available_backends, get_backend


@pytest.mark.needs_array_api_strict
def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(BackendError, match=r"unknown backend 'tpu'; available here: numpy, array-api-strict"):
        get_backend("tpu")


def test_missing_cupy_says_how_to_install_for_either_cuda_major(monkeypatch):
    monkeypatch.setattr(backend_module, "_plugins", lambda: {})
    with pytest.raises(BackendError, match=r'"npgpt\[cupy13\]" where nvidia-smi shows "CUDA Version: 13.x", "npgpt\[cupy\]"'):
        get_backend("cupy")


@pytest.mark.needs_array_api_strict
def test_bad_array_api_strict_device():
    with pytest.raises(BackendError, match="no device 'gpu7'"):
        get_backend("array-api-strict:gpu7")


@pytest.fixture
def plugin_module(monkeypatch):
    """An importable module `fakeplugin` with a backend factory `make` (devices it made
    are in `fakeplugin.made`)."""
    module = types.ModuleType("fakeplugin")
    module.made = []

    def make(device):
        module.made.append(device)
        return Backend("fake", np, device)

    module.make = make
    monkeypatch.setitem(sys.modules, "fakeplugin", module)
    return module


def test_plugins_are_found_through_entry_points(monkeypatch, plugin_module):
    entry = importlib.metadata.EntryPoint("fake", "fakeplugin:make", backend_module.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [entry])
    assert "fake" in available_backends()
    assert get_backend("fake:3").name == "fake" and plugin_module.made == ["3"]


def test_a_plugin_is_named_by_import_path_without_any_install(monkeypatch, plugin_module):
    """module:factory[:device] needs no entry point: a source checkout on PYTHONPATH."""
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert get_backend("fakeplugin:make").name == "fake"
    get_backend("fakeplugin:make:1")
    assert plugin_module.made == [None, "1"]
    with pytest.raises(BackendError, match=r"'fakeplugin' has no backend factory 'nothing'; a plugin is named as module:factory"):
        get_backend("fakeplugin:nothing")
    with pytest.raises(BackendError, match=r"unknown backend 'nosuchmodule'.*module:factory"):
        get_backend("nosuchmodule:make")


def test_a_plugin_whose_module_or_library_is_missing_is_not_listed(monkeypatch, plugin_module):
    entries = [importlib.metadata.EntryPoint("fake", "fakeplugin:make", backend_module.ENTRY_POINT_GROUP),
               importlib.metadata.EntryPoint("gone", "nosuchmodule:make", backend_module.ENTRY_POINT_GROUP)]  # fmt: skip
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: entries)
    monkeypatch.setitem(sys.modules, "cupy", None)  # CuPy not installed: the known cupy plugin is not listed
    plugin_module.available = lambda: False  # its library is missing, says the plugin
    assert not {"fake", "gone", "cupy"} & set(available_backends())
    plugin_module.available = lambda: True
    assert "fake" in available_backends() and "gone" not in available_backends()
    with pytest.raises(BackendError, match=r"backend 'gone' is not usable here \(No module named 'nosuchmodule'\)"):
        get_backend("gone")


def test_plugin_import_error_becomes_an_actionable_message(monkeypatch):
    def factory(device):
        raise ImportError("No module named 'cupy'")

    entry = importlib.metadata.EntryPoint("cupy", "x:y", backend_module.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata.EntryPoint, "load", lambda self: factory)
    monkeypatch.setattr(backend_module, "_plugins", lambda: {"cupy": entry})
    with pytest.raises(BackendError, match=r"not usable here \(No module named 'cupy'\); to fix: .*npgpt\[cupy13\]"):
        get_backend("cupy")


@pytest.mark.needs_array_api_strict
@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.integers(0, 5), min_size=1, max_size=20), seed=st.integers(0, 10**6))
def test_index_add_sums_repeated_ids_on_every_backend(ids, seed):
    """target[ids[n]] += values[n], with repeated ids accumulating (unlike target[ids] += v)."""
    values = np.random.default_rng(seed).normal(size=(len(ids), 3))
    expected = np.zeros((6, 3))
    for n, i in enumerate(ids):
        expected[i] += values[n]
    for name in ("numpy", "array-api-strict:device1"):
        b = get_backend(name)
        target = b.xp.zeros((6, 3), dtype=b.xp.float64, device=b.device)
        got = b.index_add(target, b.asarray(np.array(ids)), b.asarray(values))
        np.testing.assert_allclose(b.to_numpy(got), expected, atol=1e-12)


@pytest.mark.needs_array_api_strict
def test_uniform_is_the_same_stream_on_every_backend():
    draws = []
    for name in ("numpy", "array-api-strict:no_float64"):
        b = get_backend(name)
        x = b.uniform(np.random.default_rng(5), (4, 3), b.xp.float32)
        draws.append(b.to_numpy(x))
    np.testing.assert_array_equal(*draws)
    assert draws[0].dtype == np.float32 and 0 <= draws[0].min() and draws[0].max() < 1


@pytest.mark.needs_array_api_strict
def test_no_float64_device_refuses_float64():
    b = get_backend("array-api-strict:no_float64")
    with pytest.raises(ValueError, match="float64"):
        b.asarray(np.ones(3), dtype=b.xp.float64)


def test_peak_memory_is_reported():
    assert get_backend("numpy").peak_memory_bytes() > 10 * 2**20

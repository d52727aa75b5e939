"""Shared test fixtures: where the project's data lives, and which backends to run on.

Data (GPT-2's vocabulary, tinyshakespeare, the TF checkpoint fixture) is found through
$NPGPT_DATA, falling back to ../shared/data beside the checkout. Tests that need it skip
with a reason when it is absent -- unless $NPGPT_REQUIRE_DATA=1 (set by .ci/run): then
every skip is reported as a failure, so CI can never pass by skipping its oracles.

Backends: $NPGPT_TEST_BACKENDS is a comma-separated list of backend names (default
"numpy,array-api-strict:device1"); every test taking the `backend` fixture runs on each.
`NPGPT_TEST_BACKENDS=numpy,cupy pytest` runs the engine, training and generation tests on
a GPU.

Tests marked `needs_array_api_strict` skip where array-api-strict is not installed (a GPU
machine's own Python, tools/gpu_check.sh); under $NPGPT_REQUIRE_DATA=1 that skip fails too.
Tests marked `gpu` need CuPy and an NVIDIA GPU; they skip elsewhere, even under
$NPGPT_REQUIRE_DATA=1 (CI has no GPU). No test judges speed: the
benchmarks in tools/ do (`python tools/bench.py --help`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings

import fake_cupy
from npgpt.backend import BUILTIN, get_backend
from npgpt.kernels import threads

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NPGPT_DATA", ROOT.parent / "shared" / "data"))
REQUIRE_DATA = os.environ.get("NPGPT_REQUIRE_DATA") == "1"
TEST_BACKENDS = os.environ.get("NPGPT_TEST_BACKENDS", "numpy,array-api-strict:device1").split(",")
# "fake-cupy": the CuPy plugin's own code on tests/fake_cupy.py, NumPy standing in for a GPU
# (NPGPT_TEST_BACKENDS=numpy,fake-cupy pytest runs the suite through it without a GPU).
BUILTIN["fake-cupy"] = fake_cupy.make_backend

# Hypothesis: no per-example deadline (a busy 2-core machine is slow, not wrong). Under CI
# (CI=true) the examples are derandomized, so a run is repeatable: a property that fails
# there fails every time, and one that passes cannot turn red on the next run by chance.
settings.register_profile("npgpt", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "npgpt")


def data_path(relative: str) -> Path:
    """Path of a data file; skip the calling test with a reason when it is missing."""
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"data file {path} is missing (set NPGPT_DATA to the folder holding the data)")
    return path


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("array_api_strict") is None:
        skip = pytest.mark.skip(reason="array-api-strict is not installed (pip install array-api-strict)")
        for item in items:
            if item.get_closest_marker("needs_array_api_strict"):
                item.add_marker(skip)
    if any(item.get_closest_marker("gpu") for item in items) and (why_not := no_gpu_reason()):
        skip = pytest.mark.skip(reason=f"needs CuPy and a GPU: {why_not}")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


def no_gpu_reason() -> str | None:
    """Why the real CuPy backend cannot run here, or None when it can."""
    from npgpt.backend import BackendError

    try:
        get_backend("cupy")
    except BackendError as e:
        return str(e)
    return None


@pytest.fixture(params=TEST_BACKENDS)
def backend(request):
    return get_backend(request.param)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    exempt = item.get_closest_marker("gpu")
    if REQUIRE_DATA and report.skipped and not hasattr(report, "wasxfail") and not exempt:
        report.outcome = "failed"
        report.longrepr = f"skipped, but NPGPT_REQUIRE_DATA=1 forbids skips: {report.longrepr}"


@pytest.fixture
def restore_threads():
    """Put the pool's and the BLAS library's thread counts back after the test."""
    saved = threads._chosen, threads.MIN_ELEMENTS, threads._env_seen, threads._env_threads
    blas = threads.blas_threads()
    yield
    threads._chosen, threads.MIN_ELEMENTS, threads._env_seen, threads._env_threads = saved
    if blas is not None:
        threads._blas_functions()[1](blas)

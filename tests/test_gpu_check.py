"""tools/gpu_check.sh --quick end to end on the CuPy double, as on a GPU machine that is
offline and has never installed npgpt.

The machine is built in a temporary folder: a venv whose site-packages holds this
Python's packages except npgpt (no distribution, no entry point) and pip, plus `cupy` and
`cupyx` packages that load tests/fake_cupy.py (two GPUs, with tests/fake_nccl.py's NCCL)
and, beside its python, this Python's mpiexec (the mpich wheel's). On PATH: `pip`/`pip3`
that record the attempt and fail (no network), a `python3` that cannot import cupy (to be
passed over), then the venv. npgpt is found only through the PYTHONPATH the script sets.
So the multi-GPU steps run too: `mpiexec -n 2 ... --backend cupy` over the fake NCCL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import fake_cupy
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def offline_machine(tmp: Path) -> dict[str, str]:
    """The environment of a GPU machine's shell: its PATH and nothing of npgpt installed."""
    env_dir = tmp / "env"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", env_dir], check=True)
    site = Path(subprocess.check_output([env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip())
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        # not npgpt, nor pip; nor torch, to keep this test fast (gpu_check.sh runs with or without it)
        if "npgpt" not in entry.name and not entry.name.startswith(("pip", "_distutils_hack", "distutils-precedence", "torch")):
            (site / entry.name).symlink_to(entry)
    fake_cupy.write_import_shim(site, nccl=True)
    for tool in ("mpiexec", "mpiexec.hydra", "hydra_pmi_proxy"):  # the mpich wheel's, beside the venv's python
        if (Path(sys.executable).parent / tool).exists():
            (env_dir / "bin" / tool).symlink_to(Path(sys.executable).parent / tool)
    for lib in Path(sys.prefix, "lib").iterdir():  # and its libmpi and libfabric, where mpi4py looks (sys.prefix/lib)
        if lib.name.startswith(("libmpi", "mpich")):
            (env_dir / "lib" / lib.name).symlink_to(lib)
    stubs, plain = tmp / "stubs", tmp / "plain"
    stubs.mkdir()
    plain.mkdir()
    for name in ("pip", "pip3"):
        (stubs / name).write_text(f'#!/bin/sh\necho "$0 $*" >> {tmp}/pip-attempts\necho "ERROR: network is unreachable" >&2\nexit 1\n')
    (plain / "python3").write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named cupy' >&2\nexit 1\n")
    for stub in [*stubs.iterdir(), *plain.iterdir()]:
        stub.chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "NPGPT_DATA", "TMPDIR")}
    return keep | {"PATH": f"{stubs}:{plain}:{env_dir / 'bin'}:/usr/bin:/bin", "PIP_INDEX_URL": "http://127.0.0.1:9/"}


QUICK_ARGS = {
    "TEST_ARGS": "tests/test_cupy_gpu.py",  # the GPU-only tests, here on the double
    "INDEX_ADD_ARGS": "--rows 512 --channels 16 --vocab 1000",
    "GENERATE_ARGS": "--preset tiny --new-tokens 2 --repeats 1 --recompute-repeats 0 --ttft-tokens 0",
    "TRAIN_ARGS": "--configs tiny --repeats 1 --no-memory",
    "MULTI_GPU_ARGS": "--steps 4 --dtypes float64",
    "SCALE_ARGS": "--configs tiny --ways 1x2 2x1 2x1_overlap --rounds 1 --steps 1 --no-zero-memory",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_machine")
    env = offline_machine(tmp) | {"OUT": str(tmp / "out"), **QUICK_ARGS}
    installed = subprocess.run([f"{tmp}/env/bin/python", "-c", "import importlib.metadata as m; m.distribution('npgpt')"],
                               env=env, capture_output=True, cwd=tmp)  # not the checkout, where `pip install -e` left npgpt.egg-info  # fmt: skip
    assert installed.returncode != 0, "npgpt must not be installed in the stand-in machine"
    result = subprocess.run([SCRIPT, "--quick"], env=env, capture_output=True, text=True, timeout=300)
    return tmp, result


def test_quick_run_writes_the_json_and_the_summary_offline_without_an_install(quick_run):
    tmp, result = quick_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp / "pip-attempts").exists(), "gpu_check.sh tried to install"
    assert f"Python {tmp}/env/bin/python3" in result.stderr  # the first python3 that imports cupy
    out = tmp / "out"
    report = json.loads((out / "gpu_check.json").read_text())
    assert [(s["step"], s["status"]) for s in report["steps"]] == [
        ("info", "ok"), ("parity", "ok"), ("tests", "ok"), ("index-add", "ok"), ("generate", "ok"), ("train", "ok"),
        ("multi-gpu", "ok"), ("scale", "ok")]  # fmt: skip
    assert report["device"]["gpus"][0]["name"].startswith("fake GPU") and report["device"]["driver_cuda"] == "13.0"
    assert report["device"]["oracles"]["array_api_strict"] is not None  # (this Python has it; a GPU machine may not)
    assert all(r["ok"] for r in report["parity"]["forward"].values()) and set(report["parity"]["forward"]) == {"float16", "float32", "float64"}
    assert report["index_add"]["npgpt_index_add"]["same_bits_every_run"]
    assert report["tests"]["summary"].startswith("7 passed")  # test_cupy_gpu.py ran on the double, none skipped
    assert report["generate"]["backend"] == report["train"]["backend"] == "cupy:0"
    split = report["multi_gpu"]["dtypes"]["float64"]  # 1 process vs mpiexec -n 2 over the fake NCCL
    assert split["ok"] and split["max_param_rel_diff"] <= 1e-6 and len(split["losses"]) == 3  # steps 2, 4, validation
    assert report["scale"]["backend"] == "cupy" and report["scale"]["configs"]["tiny"]["2x1"]["ranks"] == 2
    assert report["scale"]["configs"]["tiny"]["2x1"]["backend"] == "cupy:0"
    summary = (out / "gpu_check.txt").read_text()
    assert summary in result.stdout and "forward float16" in summary and "tests: 7 passed" in summary
    assert "multi-gpu float64: 1 process vs mpiexec -n 2 over NCCL: max relative difference" in summary
    assert "scale tiny: 1 GPU " in summary and "2 GPUs " in summary
    assert (out / "gpu_check" / "pytest.txt").exists()


def test_progress_names_each_step_with_its_time_limit(quick_run):
    _, result = quick_run
    for n, step in enumerate(("info", "parity", "tests", "index-add", "generate", "train", "multi-gpu", "scale"), start=1):
        assert f"[{n}/8 {step}] (limit " in result.stderr and f"[{n}/8 {step}] ok in " in result.stderr


def test_without_mpi4py_the_multi_gpu_steps_are_skipped_saying_why_and_the_run_passes(tmp_path):
    env = offline_machine(tmp_path) | {"OUT": str(tmp_path / "out"), **QUICK_ARGS}
    for entry in (tmp_path / "env" / "lib").glob("python*/site-packages/mpi4py*"):
        entry.unlink()
    result = subprocess.run([SCRIPT, "--quick"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    why = f"skipped: {tmp_path}/env/bin/python3 cannot import mpi4py (pip install mpi4py mpich)"
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(s["step"], s["status"]) for s in report["steps"]][-2:] == [("multi-gpu", why), ("scale", why)]
    assert f"[7/8 multi-gpu] {why}" in result.stderr and f"  scale      {why}" in result.stdout


def test_without_a_python_that_imports_cupy_it_says_what_to_set(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python3").write_text("#!/bin/sh\nexit 1\n")
    (stubs / "python3").chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "NPGPT_PYTHON": str(stubs / "python3")}
    result = subprocess.run([SCRIPT, "--quick"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("error: no Python here imports cupy") and "NPGPT_PYTHON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def gpu_check(monkeypatch):
    """tools/gpu_check.py imported, on the CuPy double (two GPUs, CuPy with NCCL)."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import gpu_check

    modules = fake_cupy.install(monkeypatch, device_count=2)
    monkeypatch.setattr(modules["cupy.cuda"], "nccl", type("nccl", (), {"available": True}), raising=False)
    monkeypatch.setattr(gpu_check, "find_mpiexec", lambda: "/usr/bin/mpiexec")
    return gpu_check


def test_the_multi_gpu_steps_run_only_with_two_gpus_mpi4py_mpiexec_and_nccl(gpu_check, monkeypatch, tmp_path):
    import importlib.util

    assert gpu_check.multi_gpu_blocker() is None
    fake_cupy.reset(device_count=1)
    assert gpu_check.multi_gpu_blocker() == "1 GPU visible to CuPy, 2 needed"
    fake_cupy.reset(device_count=0)
    assert gpu_check.multi_gpu_blocker().startswith("no GPU visible (cudaErrorNoDevice")
    fake_cupy.reset(device_count=2)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mpi4py" else find_spec(name, *a))
    assert "cannot import mpi4py (pip install mpi4py mpich)" in gpu_check.multi_gpu_blocker()
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    python = sys.executable
    broken = tmp_path / "python"  # mpi4py is there, its libmpi is not
    broken.write_text("#!/bin/sh\necho 'RuntimeError: cannot load MPI library' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(broken))
    assert gpu_check.multi_gpu_blocker() == "mpi4py cannot load an MPI library (RuntimeError: cannot load MPI library)"
    monkeypatch.setattr(sys, "executable", python)
    monkeypatch.setattr(gpu_check, "find_mpiexec", lambda: None)
    assert gpu_check.multi_gpu_blocker().startswith("no mpiexec on PATH or beside ")
    monkeypatch.setattr(gpu_check, "find_mpiexec", lambda: "/usr/bin/mpiexec")
    monkeypatch.setattr(fake_cupy.modules()["cupy.cuda"].nccl, "available", False)
    assert gpu_check.multi_gpu_blocker() == "CuPy finds no NCCL library (cupy.cuda.nccl.available is False)"
    monkeypatch.delattr(fake_cupy.modules()["cupy.cuda"], "nccl")
    assert gpu_check.multi_gpu_blocker().startswith("CuPy has no NCCL")


def test_skipped_steps_show_their_reason_and_do_not_fail_the_run(gpu_check, tmp_path, capsys):
    logs = tmp_path / "gpu_check"
    logs.mkdir()
    (logs / "steps.tsv").write_text("info\tok\t1\ntests\tskipped: no pytest/hypothesis\t0\n"
                                    "multi-gpu\tskipped: 1 GPU visible to CuPy, 2 needed\t0\n"
                                    "scale\tskipped: 1 GPU visible to CuPy, 2 needed\t0\n")  # fmt: skip
    assert gpu_check.write_report(tmp_path) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["steps"][2] == {"step": "multi-gpu", "status": "skipped: 1 GPU visible to CuPy, 2 needed", "seconds": 0.0}
    assert report["multi_gpu"] is None and report["scale"] is None
    assert "  scale      skipped: 1 GPU visible to CuPy, 2 needed" in (tmp_path / "gpu_check.txt").read_text()
    (logs / "steps.tsv").write_text("info\tok\t1\nmulti-gpu\tfailed (exit 1)\t3\n")
    assert gpu_check.write_report(tmp_path) == 1

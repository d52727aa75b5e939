"""The Python steps of tools/gpu_check.sh (run with the Python it found; nothing installed).

    info         the device: GPU name, memory, driver and CUDA versions, CuPy and its wheel,
                 and which test oracles this Python has (torch, transformers, ...)
    parity       a tiny model's forward on CuPy in float16, float32 and float64 against
                 NumPy in float64, and one float32 training step's gradients; the first
                 use of each dtype compiles CuPy's kernels, timed here
    index-add    the cost of the deterministic embedding backward: npgpt's index_add vs
                 cupyx.scatter_add (atomic adds) at GPT-2's shape, and whether each gives
                 the same bits on every run
    multi-gpu    with 2 GPUs, mpi4py and mpiexec: a tiny model trained by one process
                 (--grad-accum 2) and by `mpiexec -n 2` (--grad-accum 1, each rank on its
                 own GPU, gradients over NCCL), the same global batch, must give the same
                 losses and weights (float32 and float64); `--why-not` prints why the
                 multi-GPU steps cannot run here (nothing when they can)
    report DIR   DIR/gpu_check.json and DIR/gpu_check.txt from the steps' outputs in
                 DIR/gpu_check/ (steps.tsv: name, status, seconds)

Each step writes JSON on stdout and progress on stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from npgpt.backend import get_backend
from npgpt.config import GPTConfig
from npgpt.model import GPT

TINY = GPTConfig(vocab_size=257, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
# max |logits - NumPy float64| allowed per dtype (logits are O(1); float16 has 11 bits)
FORWARD_ATOL = {"float16": 2e-2, "float32": 1e-5, "float64": 1e-12}
# multi-gpu: max |1 process - 2 ranks| / max |1 process| allowed per dtype, over the steps
# (tests/test_distributed.py's tolerances: the order of float summation differs)
SPLIT_RTOL = {"float32": 1e-4, "float64": 1e-6}
SPLIT_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
              "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n") * 12
SPLIT_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
               "--warmup-iters", "2", "--log-interval", "2", "--eval-iters", "2", "--eval-interval", "0", "--dropout", "0.1",
               "--checkpoint-interval", "1000", "--bucket-mb", "0.002"]  # several buckets  # fmt: skip
ORACLES = ("torch", "transformers", "pytest", "hypothesis", "array_api_strict", "safetensors", "tiktoken")


def say(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def version(module: str) -> str | None:
    """The version of an importable module, else None (the module is not imported)."""
    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        try:
            return getattr(__import__(module), "__version__", "unknown version")
        except ImportError:
            return None


def cuda_version(number: int) -> str:
    """CUDA's version integers (12040) as text ("12.4")."""
    return f"{number // 1000}.{number % 1000 // 10}"


def info() -> dict:
    import cupy

    runtime = cupy.cuda.runtime
    gpus = []
    for i in range(runtime.getDeviceCount()):
        props = runtime.getDeviceProperties(i)
        with cupy.cuda.Device(i) as device:
            free, total = device.mem_info
        gpus.append({"index": i, "name": props["name"].decode(), "compute_capability": f"{props['major']}.{props['minor']}",
                     "memory_total_bytes": total, "memory_free_bytes": free})  # fmt: skip
    wheel = importlib.metadata.packages_distributions().get("cupy", ["unknown"])
    report = {
        "gpus": gpus,
        "driver_cuda": cuda_version(runtime.driverGetVersion()),
        "runtime_cuda": cuda_version(runtime.runtimeGetVersion()),
        "cupy": cupy.__version__,
        "cupy_wheel": wheel[0],
        "python": f"{platform.python_version()} ({sys.executable})",
        "numpy": np.__version__,
        "oracles": {name: version(name) for name in ORACLES},
        "nvidia_smi": nvidia_smi(),
    }
    torch_version = report["oracles"]["torch"]
    if torch_version is not None:
        import torch

        report["torch_cuda"] = torch.version.cuda if torch.cuda.is_available() else "no GPU visible to torch"
    g = gpus[0] if gpus else {}
    say(f"{g.get('name', 'no GPU')}, {g.get('memory_total_bytes', 0) / 2**30:.1f} GiB; driver CUDA {report['driver_cuda']}, "
        f"runtime CUDA {report['runtime_cuda']}; CuPy {report['cupy']} ({report['cupy_wheel']}); torch {torch_version}")  # fmt: skip
    return report


def nvidia_smi() -> str:
    """nvidia-smi's one-line-per-GPU summary, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu", "--format=csv,noheader"]
    result = subprocess.run(query, capture_output=True, text=True, timeout=30)
    return (result.stdout or result.stderr).strip()


def parity() -> dict:
    gpu = get_backend("cupy")
    ids = np.arange(2 * 40).reshape(2, 40) % TINY.vocab_size
    reference = GPT.init(TINY, seed=0, dtype="float64").forward(ids)
    report = {"config": TINY.to_json(), "forward": {}}
    for dtype, atol in FORWARD_ATOL.items():
        start = time.perf_counter()
        try:
            model = GPT.init(TINY, backend=gpu, seed=0, dtype=dtype)
            got = gpu.to_numpy(model.forward(ids)).astype(np.float64)
        except Exception as e:  # a BackendError (float16 headers), a compile error, ...
            report["forward"][dtype] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            say(f"forward {dtype}: FAILED ({report['forward'][dtype]['error']})")
            continue
        diff = float(np.abs(got - reference).max())
        report["forward"][dtype] = {"ok": diff <= atol, "max_abs_diff": diff, "atol": atol,
                                    "first_use_s": time.perf_counter() - start}  # fmt: skip
        say(f"forward {dtype}: max |diff| {diff:.2e} (allowed {atol:.0e}), {report['forward'][dtype]['first_use_s']:.1f} s")
    targets = np.roll(ids, -1, axis=1)
    _, ref_grads = GPT.init(TINY, seed=0).loss_and_grads(ids, targets)
    _, grads = GPT.init(TINY, backend=gpu, seed=0).loss_and_grads(ids, targets)
    worst = max(float(np.abs(gpu.to_numpy(grads[k]) - v).max() / (np.abs(v).max() + 1e-30)) for k, v in ref_grads.items())
    report["grads_float32"] = {"ok": worst <= 1e-4, "max_relative_diff": worst, "allowed": 1e-4}
    say(f"gradients float32: worst max|diff|/max|grad| {worst:.2e} (allowed 1e-4)")
    report["ok"] = all(r["ok"] for r in report["forward"].values()) and report["grads_float32"]["ok"]
    return report


def index_add_cost(rows: int = 8 * 512, channels: int = 768, vocab: int = 50257, repeats: int = 10) -> dict:
    """Median seconds of npgpt's deterministic index_add and of cupyx.scatter_add on the
    embedding backward of a B*T = `rows` batch (Zipf-distributed ids, as text is)."""
    import cupyx

    gpu = get_backend("cupy")
    xp = gpu.xp
    rng = np.random.default_rng(0)
    host_ids = np.minimum(rng.zipf(1.2, rows), vocab) - 1
    ids, values = gpu.asarray(host_ids), gpu.asarray(rng.normal(size=(rows, channels)).astype(np.float32))

    def deterministic(target):
        return gpu.index_add(target, ids, values)

    def atomic(target):
        cupyx.scatter_add(target, ids, values)
        return target

    report = {"rows": rows, "channels": channels, "vocab": vocab, "distinct_ids": int(np.unique(host_ids).size)}
    for name, fn in (("npgpt_index_add", deterministic), ("cupyx_scatter_add", atomic)):
        results, seconds = [], []
        for _ in range(repeats + 1):
            target = xp.zeros((vocab, channels), dtype=xp.float32, device=gpu.device)
            gpu.synchronize()
            start = time.perf_counter()
            fn(target)
            gpu.synchronize()
            seconds.append(time.perf_counter() - start)
            results.append(gpu.to_numpy(target))
        report[name] = {"median_s": float(np.median(seconds[1:])),
                        "same_bits_every_run": all(np.array_equal(results[0], r) for r in results[1:])}  # fmt: skip
        say(f"{name}: {report[name]['median_s'] * 1e3:.3f} ms, same bits every run: {report[name]['same_bits_every_run']}")
    return report


def find_mpiexec() -> str | None:
    """mpiexec on PATH, else beside this Python (where the mpich wheel puts it)."""
    beside = Path(sys.executable).parent / "mpiexec"
    return shutil.which("mpiexec") or (str(beside) if beside.exists() else None)


def multi_gpu_blocker() -> str | None:
    """Why the multi-GPU steps cannot run on this machine; None when they can."""
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        return f"no GPU visible ({e})"
    if count < 2:
        return f"{count} GPU visible to CuPy, 2 needed"
    if importlib.util.find_spec("mpi4py") is None:
        return f"{sys.executable} cannot import mpi4py (pip install mpi4py mpich)"
    loaded = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"], capture_output=True, text=True, timeout=60)
    if loaded.returncode:  # mpi4py without a loadable MPI library (in its own process: MPI_Init happens on import)
        lines = loaded.stderr.strip().splitlines()
        return f"mpi4py cannot load an MPI library ({lines[-1] if lines else f'exit {loaded.returncode}'})"
    if find_mpiexec() is None:
        return f"no mpiexec on PATH or beside {sys.executable} (pip install mpich)"
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        return f"CuPy has no NCCL ({e})"
    if not getattr(nccl, "available", True):
        return "CuPy finds no NCCL library (cupy.cuda.nccl.available is False)"
    return None


def gpu_list() -> list[str]:
    """`nvidia-smi -L`'s lines (empty without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return []
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return result.stdout.strip().splitlines()


def relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    return float(np.max(np.abs(a - b))) / scale if scale else float(np.max(np.abs(b), initial=0.0))


def split_check(logs: Path, steps: int = 10, dtypes=("float32", "float64")) -> dict:
    """One process with --grad-accum 2 against `mpiexec -n 2` with --grad-accum 1 on the
    GPUs: losses and final weights within SPLIT_RTOL (each run's stderr in `logs`)."""
    from npgpt.checkpoint import load_safetensors

    mpiexec = find_mpiexec()
    report = {"gpus_nvidia_smi": gpu_list(), "steps": steps, "dtypes": {}}
    with tempfile.TemporaryDirectory(prefix="npgpt-multi-gpu-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(SPLIT_TEXT, encoding="utf-8")
        for dtype in dtypes:
            runs, result = {}, {"rtol": SPLIT_RTOL[dtype]}
            for ranks, launcher in ((1, []), (2, [mpiexec, "-n", "2"])):
                out = Path(tmp) / f"{dtype}-{ranks}"
                cmd = [*launcher, sys.executable, "-m", "npgpt.train", "--backend", "cupy", "--data", str(corpus),
                       "--out-dir", str(out), *SPLIT_FLAGS, "--max-iters", str(steps), "--grad-accum", str(2 // ranks),
                       "--dtype", dtype]  # fmt: skip
                say(f"multi-gpu {dtype}: {'mpiexec -n 2 (NCCL)' if ranks > 1 else '1 process'} ...")
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NCCL_DEBUG": "INFO"})
                result[f"seconds_{ranks}"] = time.perf_counter() - start
                (logs / f"multi_gpu_{dtype}_{ranks}.log").write_text(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}")
                if done.returncode:
                    lines = [line for line in done.stderr.splitlines() if line.strip()]
                    result["error"] = f"{ranks} rank(s) exited {done.returncode}: {lines[-1] if lines else ''}"
                    break
                runs[ranks] = out
            if "error" not in result:
                logged = [[json.loads(line) for line in (runs[r] / "log.jsonl").read_text().splitlines()] for r in (1, 2)]
                losses = [[row.get("loss", row.get("val_loss")) for row in rows] for rows in logged]  # training and validation
                result["losses"] = losses[0]
                result["max_loss_rel_diff"] = max((abs(a - b) / abs(a) for a, b in zip(*losses)), default=float("inf"))
                if len(losses[0]) != len(losses[1]) or None in losses[0] + losses[1]:
                    result["max_loss_rel_diff"] = float("inf")
                one, two = (load_safetensors(runs[r] / "model.safetensors")[0] for r in (1, 2))
                result["max_param_rel_diff"] = max(relative_diff(one[k], two[k]) for k in one) if one.keys() == two.keys() else None
                result["nccl_in_log"] = "NCCL INFO" in (logs / f"multi_gpu_{dtype}_2.log").read_text()
            params = result.get("max_param_rel_diff")
            worst = max(result.get("max_loss_rel_diff", float("inf")), float("inf") if params is None else params)
            result["ok"] = worst <= result["rtol"]
            report["dtypes"][dtype] = result
            say(f"multi-gpu {dtype}: " + (result.get("error") or f"max relative difference {worst:.1e} "
                                          f"(allowed {result['rtol']:.0e}): {'ok' if result['ok'] else 'FAILED'}"))  # fmt: skip
    report["ok"] = all(r["ok"] for r in report["dtypes"].values())
    return report


def write_report(dest: Path) -> int:
    """gpu_check.json and gpu_check.txt in `dest` from the steps in dest/gpu_check/."""
    logs = dest / "gpu_check"
    steps = []
    for line in (logs / "steps.tsv").read_text().splitlines():
        name, status, seconds = line.split("\t")
        steps.append({"step": name, "status": status, "seconds": float(seconds)})
    report: dict = {"steps": steps}
    for name in ("device", "parity", "index_add", "generate", "train", "multi_gpu", "scale"):
        path = logs / f"{name}.json"
        try:
            report[name] = json.loads(path.read_text()) if path.exists() and path.stat().st_size else None
        except json.JSONDecodeError as e:
            report[name] = {"unreadable": f"{path}: {e}"}
    pytest_log = logs / "pytest.txt"
    if pytest_log.exists():
        lines = [line for line in pytest_log.read_text().splitlines() if line.strip()]
        report["tests"] = {"summary": lines[-1] if lines else "", "log": str(pytest_log)}
    (dest / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = summary_lines(report)
    (dest / "gpu_check.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0 if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in steps) else 1


def summary_lines(report: dict) -> list[str]:
    lines = ["gpu_check summary"]
    device = report.get("device") or {}
    for g in device.get("gpus", []):
        lines.append(f"  GPU {g['index']}: {g['name']} (sm {g['compute_capability']}), {g['memory_total_bytes'] / 2**30:.1f} GiB")
    if device:
        lines.append(f"  driver CUDA {device['driver_cuda']}, runtime CUDA {device['runtime_cuda']}, "
                     f"CuPy {device['cupy']} ({device['cupy_wheel']}), torch {device['oracles'].get('torch')}")  # fmt: skip
    for step in report["steps"]:
        lines.append(f"  {step['step']:<10} {step['status']:<24} {step['seconds']:7.1f} s")
    for dtype, r in ((report.get("multi_gpu") or {}).get("dtypes") or {}).items():
        lines.append(f"  multi-gpu {dtype}: 1 process vs mpiexec -n 2 over NCCL: " + (f"FAILED: {r['error']}" if "error" in r else
                     f"max relative difference {max(r['max_loss_rel_diff'], r['max_param_rel_diff'] or 0):.1e} <= "
                     f"{r['rtol']:.0e}: {'ok' if r['ok'] else 'FAILED'}"))  # fmt: skip
    for config, row in ((report.get("scale") or {}).get("configs") or {}).items():
        rates = [f"{'1 GPU' if name == '1x2' else '2 GPUs' + (' (overlap)' if 'overlap' in name else '')} {r['tokens_per_s']:,.0f} tokens/s"
                 for name, r in row.items() if isinstance(r, dict) and "tokens_per_s" in r]  # fmt: skip
        ratio = next((f" ({row[k]:.2f}x)" for k in ("ratio_2x1_overlap_over_1x2", "ratio_2x1_over_1x2") if k in row), "")
        lines.append(f"  scale {config}: " + ", ".join(rates) + ratio)
    parity_report = report.get("parity") or {}
    for dtype, r in parity_report.get("forward", {}).items():
        lines.append(f"  forward {dtype}: " + (f"max |diff| {r['max_abs_diff']:.1e} <= {r['atol']:.0e}: {'ok' if r['ok'] else 'FAILED'}"
                                               if "max_abs_diff" in r else f"FAILED: {r['error']}"))  # fmt: skip
    cost = report.get("index_add") or {}
    if "npgpt_index_add" in cost:
        ours, atomic = cost["npgpt_index_add"], cost["cupyx_scatter_add"]
        lines.append(f"  embedding backward: deterministic {ours['median_s'] * 1e3:.2f} ms vs atomic {atomic['median_s'] * 1e3:.2f} ms "
                     f"(same bits every run: {ours['same_bits_every_run']} vs {atomic['same_bits_every_run']})")  # fmt: skip
    for name in ("generate", "train"):
        for row in (report.get(name) or {}).get("results", []):
            timed = {k: v for k, v in (row.get("cached") or row).items() if k in ("npgpt", "torch", "tokens_per_s")}
            rates = timed if "tokens_per_s" not in timed else {"npgpt": timed}
            lines.append(f"  {name}: " + ", ".join(f"{who} {r['tokens_per_s']:.0f} tokens/s" for who, r in rates.items()
                                                   if isinstance(r, dict) and "tokens_per_s" in r))  # fmt: skip
    if "tests" in report:
        lines.append(f"  tests: {report['tests']['summary']}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["info", "parity", "index-add", "multi-gpu", "report"])
    ap.add_argument("dest", nargs="?", type=Path, help="report: the folder holding gpu_check/")
    ap.add_argument("--rows", type=int, default=8 * 512, help="index-add: ids per batch, B*T (default 4096)")
    ap.add_argument("--channels", type=int, default=768, help="index-add: C (default 768)")
    ap.add_argument("--vocab", type=int, default=50257, help="index-add: V (default 50257)")
    ap.add_argument("--why-not", action="store_true", help="multi-gpu: print why it cannot run here (nothing: it can)")
    ap.add_argument("--logs", type=Path, default=Path("."), help="multi-gpu: where each run's output goes")
    ap.add_argument("--steps", type=int, default=10, help="multi-gpu: training steps per run (default 10)")
    ap.add_argument("--dtypes", nargs="+", default=list(SPLIT_RTOL), choices=list(SPLIT_RTOL), help="multi-gpu: dtypes to check")
    args = ap.parse_args(argv)
    if args.step == "multi-gpu" and args.why_not:
        print(multi_gpu_blocker() or "")
        return 0
    if args.step == "report":
        if args.dest is None:
            ap.error("report needs the results folder")
        return write_report(args.dest)
    steps = {"info": info, "parity": parity, "index-add": lambda: index_add_cost(args.rows, args.channels, args.vocab),
             "multi-gpu": lambda: split_check(args.logs, args.steps, args.dtypes)}  # fmt: skip
    result = steps[args.step]()
    print(json.dumps(result, indent=2))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())

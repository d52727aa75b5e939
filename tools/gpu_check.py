"""The Python steps of tools/gpu_check.sh (run with the Python it found; nothing installed).

    info         the device: GPU name, memory, driver and CUDA versions, CuPy and its wheel,
                 and which test oracles this Python has (torch, transformers, ...)
    parity       a tiny model's forward on CuPy in float16, float32 and float64 against
                 NumPy in float64, and one float32 training step's gradients; the first
                 use of each dtype compiles CuPy's kernels, timed here
    index-add    the cost of the deterministic embedding backward: npgpt's index_add vs
                 cupyx.scatter_add (atomic adds) at GPT-2's shape, and whether each gives
                 the same bits on every run
    report DIR   DIR/gpu_check.json and DIR/gpu_check.txt from the steps' outputs in
                 DIR/gpu_check/ (steps.tsv: name, status, seconds)

Each step writes JSON on stdout and progress on stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from npgpt.backend import get_backend
from npgpt.config import GPTConfig
from npgpt.model import GPT

TINY = GPTConfig(vocab_size=257, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
# max |logits - NumPy float64| allowed per dtype (logits are O(1); float16 has 11 bits)
FORWARD_ATOL = {"float16": 2e-2, "float32": 1e-5, "float64": 1e-12}
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


def write_report(dest: Path) -> int:
    """gpu_check.json and gpu_check.txt in `dest` from the steps in dest/gpu_check/."""
    logs = dest / "gpu_check"
    steps = []
    for line in (logs / "steps.tsv").read_text().splitlines():
        name, status, seconds = line.split("\t")
        steps.append({"step": name, "status": status, "seconds": float(seconds)})
    report: dict = {"steps": steps}
    for name in ("device", "parity", "index_add", "generate", "train"):
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
    return 0 if all(s["status"] in ("ok", "skipped") for s in steps) else 1


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
    ap.add_argument("step", choices=["info", "parity", "index-add", "report"])
    ap.add_argument("dest", nargs="?", type=Path, help="report: the folder holding gpu_check/")
    ap.add_argument("--rows", type=int, default=8 * 512, help="index-add: ids per batch, B*T (default 4096)")
    ap.add_argument("--channels", type=int, default=768, help="index-add: C (default 768)")
    ap.add_argument("--vocab", type=int, default=50257, help="index-add: V (default 50257)")
    args = ap.parse_args(argv)
    if args.step == "report":
        if args.dest is None:
            ap.error("report needs the results folder")
        return write_report(args.dest)
    steps = {"info": info, "parity": parity, "index-add": lambda: index_add_cost(args.rows, args.channels, args.vocab)}
    result = steps[args.step]()
    print(json.dumps(result, indent=2))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())

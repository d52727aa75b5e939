"""What every npgpt benchmark shares: thread control, interleaved timing, the machine's
ceilings (float32 matmul rate, memory bandwidth) and the JSON report.

These 2-core machines are shared and noisy, so a benchmark runs npgpt and its peer
round-robin in one process at the same thread count, and reports medians and their
ratio; /proc/loadavg in the report says how busy the machine was.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager

import numpy as np


def load_average() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return []


def machine() -> dict:
    """Facts a reader needs to judge the numbers: CPUs, load, BLAS, versions."""
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "loadavg_1_5_15": load_average(),
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: p.get(k) for k in ("internal_api", "version", "threading_layer", "architecture", "num_threads")}
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        ]
    except ImportError:
        pass
    return info


@contextmanager
def threads(n: int):
    """Limit NumPy's BLAS (and PyTorch, if imported) to n threads inside the block."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    with threadpool_limits(limits=n):
        if torch:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch:
                torch.set_num_threads(before)


def interleaved(contenders: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each zero-argument callable `repeats` times, round-robin (A B A B ...), so
    that load from other processes hits all contenders alike. Returns seconds per call."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "runs": len(seconds)}


def matmul_rate(shapes: list[tuple[int, int, int]], dtype=np.float32, repeats: int = 5) -> float:
    """This machine's float32 GEMM rate in FLOP/s on the given (M, K, N) shapes at the
    current thread limit: best-of-`repeats` per shape, total FLOPs over total time.
    The physical ceiling a forward pass made of these GEMMs can reach."""
    rng = np.random.default_rng(0)
    flops = seconds = 0.0
    for m, k, n in shapes:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        flops += 2.0 * m * k * n
        seconds += best
    return flops / seconds


def memory_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: summing a float32 array much larger than the caches
    (the access pattern of decoding, which streams every weight once per token)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    a.sum()
    return nbytes / min(_timed(a.sum) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_bytes() -> int:
    """This process's peak RSS: /proc's VmHWM (getrusage's ru_maxrss survives fork + exec,
    so a child process would report its parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit(report: dict):
    """Print the report as JSON on stdout (progress goes to stderr)."""
    report = {"machine": machine(), **report}
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


def log(*args):
    print(*args, file=sys.stderr, flush=True)

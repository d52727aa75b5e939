"""Evaluation benchmark: the whole `python -m npgpt.eval` run, as a user starts it (a
subprocess: start-up, reading and encoding the text, scoring), on a text file with the
shipped model, at each thread count asked for, round-robin. Reports each run's wall time,
the time eval reports for scoring alone, tokens/s, the CPU seconds the run used (user +
system) and so the cores it had on average (a busy machine gives fewer than its threads),
and /proc/loadavg before each run. `--workers threads processes` runs eval's
--workers ways (threads in one process; forked processes of one thread each) round-robin;
the default is eval's own default, auto.

    python tools/bench.py eval [--threads 2] [--repeats 3] [--workers threads processes] [--stride N] [--data FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import BenchError, emit, load_average, log  # noqa: E402  (tools/ is on sys.path: run through tools/bench.py)

DATA = Path(os.environ.get("NPGPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def run_eval(weights: str, data: Path, threads: int, stride: int | None, workers: str = "auto",
             max_tokens: int | None = None) -> dict:
    command = [sys.executable, "-m", "npgpt.eval", "--weights", weights, "--data", str(data), "--threads", str(threads),
               "--json", "--quiet"] + ([] if stride is None else ["--stride", str(stride)]) \
        + ["--workers", workers] + ([] if max_tokens is None else ["--max-tokens", str(max_tokens)])  # fmt: skip
    load = load_average()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise BenchError(f"npgpt.eval failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    result = json.loads(done.stdout)
    return {"threads": threads, "workers": workers, "wall_s": wall, "scoring_s": result["seconds"], "cpu_s": cpu, "cores_used": cpu / wall,
            "loadavg_1_5_15_before": load,
            "tokens": result["tokens_evaluated"], "tokens_per_s": result["tokens_evaluated"] / result["seconds"],
            "stride": result["stride"], "context": result["context"], "loss": result["loss"]}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.py eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per thread count (default 3)")
    parser.add_argument("--workers", nargs="+", choices=("auto", "threads", "processes"), default=["auto"],
                        help="eval's --workers: auto (eval's default), threads in one process and/or processes, round-robin")
    parser.add_argument("--max-tokens", type=int, help="eval's --max-tokens (default: the whole text)")
    parser.add_argument("--stride", type=int, help="eval's --stride (default: eval's default)")
    parser.add_argument("--weights", default="shakespeare", help="eval's --weights (default shakespeare, the shipped model)")
    parser.add_argument("--data", type=Path, default=DATA / "corpora" / "tinyshakespeare.txt", help="text file to score")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        raise BenchError(f"no text file at {args.data}; give --data FILE or set NPGPT_DATA")
    runs = []
    kinds = [(n, w) for n in args.threads for w in args.workers if n > 1 or w != "processes"]
    for repeat in range(args.repeats):
        for n, workers in kinds:
            runs.append(run_eval(args.weights, args.data, n, args.stride, workers, args.max_tokens))
            log(f"run {repeat + 1}/{args.repeats}, {n} thread(s), {workers}: {runs[-1]['wall_s']:.1f} s wall, "
                f"{runs[-1]['tokens_per_s']:,.0f} tokens/s, {runs[-1]['cores_used']:.2f} cores used, "
                f"loadavg before {runs[-1]['loadavg_1_5_15_before']}")  # fmt: skip
    by_threads = {}
    for n, workers in kinds:
        mine = [r for r in runs if (r["threads"], r["workers"]) == (n, workers)]
        by_threads[str(n) if workers == "threads" else f"{n} {workers}"] = {"median_wall_s": statistics.median(r["wall_s"] for r in mine), "min_wall_s": min(r["wall_s"] for r in mine),
                              "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine)}  # fmt: skip
    report = {"benchmark": "eval", "weights": args.weights, "data": args.data.name, "runs": runs, "by_threads": by_threads}
    emit(report, [f"{n if ' ' in n else n + ' thread(s)'}: median {s['median_wall_s']:.1f} s wall (min {s['min_wall_s']:.1f}), "
                  f"{s['median_tokens_per_s']:,.0f} tokens/s" for n, s in by_threads.items()])  # fmt: skip
    return 0

"""Data-parallel scaling: `python tools/bench.py scale [--configs a c] [--steps 3] [--rounds 2] [--ways ...]`.

The same training step (forward + backward of two micro-batches of train config a or c,
gradients summed over them and, with 2 ranks, over MPI in buckets of 25 MB; global-norm
clipping; AdamW) run two ways on this machine, with the same global batch:

    1 rank  x 2 threads   --grad-accum 2
    2 ranks x 1 thread    --grad-accum 1 each, under mpiexec -n 2

    2 ranks x 1 thread, 2x1_overlap: the same, buckets started by the backward hook

Each way is a fresh process (group) per round, the ways alternating round by round so that
load from other processes hits all alike. Reported per config: median step time and
tokens/s of each way, their ratio (2 ranks / 1 rank), the share of the step rank 0 spent
blocked on communication (which includes waiting for a slower rank), the gradient
all-reduce's time alone (ranks in step, nothing else running), and, from 2x1_overlap (the
backward hook starting each bucket as soon as its gradients are final; 2x1 starts them
all after the backward pass), the share of that time hidden: 1 - (wait with overlap) /
(all-reduce alone). Then the
ZeRO-1 memory on config a: bytes of AdamW moments per rank and peak RSS, unsharded vs
--zero 1 on 2 ranks.

Configs (tools/bench_train.py): a = 6 layers, 384 wide, T 256, B 8, vocab 65;
c = GPT-2 124M, T 1024, B 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent)]

from benchlib import emit, log, peak_rss_bytes, threads  # noqa: E402
from bench_train import CONFIGS  # noqa: E402
from npgpt.config import GPTConfig  # noqa: E402
from npgpt.distributed import DataParallel, connect  # noqa: E402
from npgpt.model import GPT  # noqa: E402


WAYS = {"1x2": dict(ranks=1, threads_=2), "2x1": dict(ranks=2, threads_=1),
        "2x1_overlap": dict(ranks=2, threads_=1, overlap=True)}


# -- one process (one rank) --------------------------------------------------------------------
def worker(args) -> dict:
    """Time `steps` data-parallel steps (after one warm-up) on this rank; rank 0 returns
    the numbers (the other ranks None)."""
    comm = connect()
    spec = CONFIGS[args.config]
    cfg, B, T = GPTConfig(**spec["cfg"]), spec["B"], spec["T"]
    accum = 2 // comm.size
    with threads(args.threads):
        model = GPT.init(cfg, seed=0)
        dp = DataParallel(model, comm, accum, zero=args.zero, bucket_mb=args.bucket_mb, betas=(0.9, 0.95))
        rng = np.random.default_rng(comm.rank)
        batches = [(rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))) for _ in range(accum)]
        hook = getattr(dp, "ready", None) if args.overlap else None
        times, waits = [], []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            for micro, (ids, targets) in enumerate(batches):
                last = micro == accum - 1
                if hook is not None and last:
                    model.loss_and_grads(ids, targets, grad_ready=hook)
                else:
                    _, grads = model.loss_and_grads(ids, targets)
                    dp.add(grads, final=last)
            dp.reduce()
            dp.clip_and_step(1.0, 1e-4)
            elapsed = time.perf_counter() - start
            wait = comm.take_wait_seconds()
            if step:  # the first step warms up allocator and caches
                times.append(elapsed)
                waits.append(wait)
        allreduce = []  # the gradient all-reduce alone, ranks in step (a barrier before each)
        for _ in range(3 if comm.size > 1 else 0):
            comm.allreduce_host(np.zeros(1))
            start = time.perf_counter()
            comm.wait([comm.start_allreduce(dp.flat_grads[a:b]) for a, b, _ in dp.layout.buckets])
            allreduce.append(time.perf_counter() - start)
    if comm.rank:
        return None
    step_s = statistics.median(times)
    return {"ranks": comm.size, "threads": args.threads, "grad_accum": accum, "zero": args.zero, "overlap": args.overlap,
            "step_s": step_s, "step_times_s": times, "tokens_per_s": 2 * B * T / step_s,
            "comm_wait_s": statistics.median(waits), "comm_wait_share": statistics.median(w / t for w, t in zip(waits, times)),
            "allreduce_alone_s": statistics.median(allreduce) if allreduce else 0.0,
            "gradient_bytes": int(sum(p.nbytes for p in model.params.values())),
            "optimizer_bytes_per_rank": dp.optimizer_bytes(), "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip


def run_worker(ranks: int, threads_: int, config: str, steps: int, zero=0, overlap=False, timeout=3600) -> dict:
    """One fresh worker process (or mpiexec group); its JSON line."""
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--threads", str(threads_), "--steps", str(steps),
           "--zero", str(zero)] + (["--overlap"] if overlap else [])  # fmt: skip
    if ranks > 1:
        mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
        cmd = [mpiexec, "-n", str(ranks), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/bench.py scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["a", "c"], choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each way, alternating")
    ap.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS), help="what to time (default: all three)")
    ap.add_argument("--no-zero-memory", action="store_true", help="skip the ZeRO-1 memory runs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overlap", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="a", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--bucket-mb", type=float, default=25.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        result = worker(args)
        if result is not None:
            print(json.dumps(result), flush=True)
        return 0

    report = {"configs": {}}
    for config in args.configs:
        ways = {name: WAYS[name] for name in args.ways}
        runs = {name: [] for name in ways}
        for r in range(args.rounds):
            for name, way in ways.items():
                log(f"scale {config} {name} round {r + 1}/{args.rounds} ...")
                runs[name].append(run_worker(config=config, steps=args.steps, **way))
        row = {}
        for name, results in runs.items():
            steps = [t for res in results for t in res["step_times_s"]]
            row[name] = {**results[-1], "step_s": statistics.median(steps), "step_times_s": steps,
                         "tokens_per_s": results[-1]["tokens_per_s"] * results[-1]["step_s"] / statistics.median(steps),
                         "comm_wait_share": statistics.median(res["comm_wait_share"] for res in results),
                         "comm_wait_s": statistics.median(res["comm_wait_s"] for res in results),
                         "allreduce_alone_s": statistics.median(res["allreduce_alone_s"] for res in results)}  # fmt: skip
        if "1x2" in row and "2x1" in row:
            row["ratio_2x1_over_1x2"] = row["2x1"]["tokens_per_s"] / row["1x2"]["tokens_per_s"]
        if "2x1" in row and "2x1_overlap" in row:
            alone, overlapped = row["2x1"]["allreduce_alone_s"], row["2x1_overlap"]["comm_wait_s"]
            row["hidden_comm_share"] = max(0.0, 1.0 - overlapped / alone) if alone > 0 else None
        report["configs"][config] = row
        log(json.dumps({k: v if not isinstance(v, dict) else {kk: v[kk] for kk in ("tokens_per_s", "comm_wait_share")}
                        for k, v in row.items()}))  # fmt: skip
    if args.no_zero_memory:
        emit(report)
        return 0
    log("ZeRO-1 memory on config a ...")
    report["zero1_memory_config_a"] = {
        f"zero{z}": {k: v for k, v in run_worker(2, 1, "a", 1, zero=z).items() if k in ("optimizer_bytes_per_rank", "peak_rss_bytes", "gradient_bytes")}
        for z in (0, 1)
    }  # fmt: skip
    emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training benchmark: `python tools/bench.py train [--vs torch] [--configs a b c] [--backend cupy] [--recipe ...]`.

Step time, float32, random init (GPT-2's), random token batches:
    a     n_layer 6, n_head 6, n_embd 384, T 256, B 8, vocab 65   forward + backward + clip + AdamW
    b     the same with vocab 50257                                forward + backward + clip + AdamW
    c     GPT-2 124M, B 1, T 1024                                   forward + backward
    g     GPT-2 124M, B 8, T 512 (the GPU step)                     forward + backward + clip + AdamW
    r     4 layers, 4 heads, 128 channels, T 64, B 12, vocab 65     forward + backward + clip + AdamW
          (the shakespeare-char recipe's step, for quick A/B runs; the race is --recipe)
    tiny  2 layers, 64 channels, B 2, T 32 (smoke runs)             forward + backward + clip + AdamW
each against the identical PyTorch model (transformers' GPT2LMHeadModel with npgpt's
weights, F.cross_entropy, clip_grad_norm_, torch.optim.AdamW) on the same batch,
interleaved in one process at the same thread count (--backend cupy: npgpt on the GPU
vs PyTorch CUDA). Reported: median step time, the ratio npgpt / torch, tokens/s, the
first step's loss in both, and the fraction of the GEMM ceiling (FLOPs: each forward
GEMM of benchlib.forward_gemms and its two gradient GEMMs; the ceiling: the best of
NumPy's (or the backend's) matmul and torch.matmul on those very shapes, measured in the
same run). Peak RSS (NumPy) is measured for each side alone in a fresh subprocess (two
steps); on a GPU, peak device memory of the run.

--recipe shakespeare-char: the CPU character-level recipe (4 layers, 4 heads, 128
embd, context 64, batch 12, 2000 iterations, lr 1e-3 with 100 warm-up steps and cosine
to 1e-4, AdamW betas (0.9, 0.99), weight decay 0.1, clip 1.0, no dropout) on a 90/10
split of tinyshakespeare, through npgpt and through an equivalent PyTorch loop from the
same initial weights and the same batches. The two loops alternate in chunks of 10
steps so machine load hits both alike; reported: training wall time of each and the
final validation loss over 200 fixed validation batches.

--profile: npgpt's step alone, each kernel of its set timed (wall, process CPU, and the
calling thread's CPU): on a busy machine CPU seconds still show where the work goes and
what runs on one core (main_thread_share near 1.0 at several threads: serial), the
step's system CPU seconds and minor page faults (fresh memory's first touches), and
"untimed" is what runs between the kernels (residual adds, the pieces' gradient sum,
reshapes, clipping). The schedules are not timed: they run the others. Where a training
batch runs in pieces on several threads, the pieces' kernels overlap: each kernel's wall
and process CPU seconds then include the other pieces' work meanwhile, so they add up to
more than the step's (and "untimed" goes negative). So each piece is also timed on its
own thread ("train_pieces": wall, and on Linux the seconds it ran, waited for a CPU
(other processes) and was blocked (wall - ran - waited: mostly waits for the GIL)),
with the pieces' span and the step's time outside it (where the batch is split, the LM
head between the pieces' forwards and backwards; the gradient sum, clipping, AdamW).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from benchlib import (TINY, NpgptStep, TorchStep, check_fractions, emit, gemm_ceiling, interleaved, log, optional_torch,
                      peak_rss_bytes, summary, threads, torch_device, torch_for, total_flops, train_gemms)  # fmt: skip

from npgpt.backend import get_backend
from npgpt.config import GPTConfig
from npgpt.kernels import NAMES as KERNEL_NAMES
from npgpt.kernels import SCHEDULE
from npgpt.model import GPT
from npgpt.optim import cosine_lr

BENCH = Path(__file__).resolve().parent / "bench.py"
RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block=64, batch=12, iters=2000, lr=1e-3, min_lr=1e-4, warmup=100,
              betas=(0.9, 0.99), val_batches=200, chunk=10)  # fmt: skip
CONFIGS = {
    "a": dict(cfg=dict(n_layer=6, n_head=6, n_embd=384, vocab_size=65, n_ctx=256), B=8, T=256, optimizer=True),
    "b": dict(cfg=dict(n_layer=6, n_head=6, n_embd=384, vocab_size=50257, n_ctx=256), B=8, T=256, optimizer=True),
    "c": dict(cfg=dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_ctx=1024), B=1, T=1024, optimizer=False),
    "g": dict(cfg=dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_ctx=1024), B=8, T=512, optimizer=True),
    "r": dict(cfg=dict(n_layer=RECIPE["n_layer"], n_head=RECIPE["n_head"], n_embd=RECIPE["n_embd"], vocab_size=65,
                       n_ctx=RECIPE["block"]), B=RECIPE["batch"], T=RECIPE["block"], optimizer=True),  # the recipe's step
    "tiny": dict(cfg=TINY, B=2, T=32, optimizer=True),
}
DATA = Path(os.environ.get("NPGPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SHAKESPEARE = DATA / "corpora" / "tinyshakespeare.txt"


# -- step benchmark ------------------------------------------------------------------------
def step_spec(config: str, args) -> tuple[GPTConfig, int, int, bool]:
    """(model config, B, T, optimizer) of a named config, with --batch/--seq applied."""
    spec = CONFIGS[config]
    B, T = args.batch or spec["B"], args.seq or spec["T"]
    cfg = GPTConfig(**spec["cfg"])
    return dataclasses.replace(cfg, n_ctx=max(cfg.n_ctx, T)), B, T, spec["optimizer"]


def batch(cfg, B, T, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


def make_step(name, torch, cfg, host, backend, optimizer, betas=(0.9, 0.95), seed=0):
    """A fresh contender: npgpt's step on a GPT.init(seed) model, or PyTorch's on `host`
    (the same weights) beside the backend."""
    if name == "npgpt":
        return NpgptStep(GPT.init(cfg, backend, seed=seed), optimizer, betas)
    return TorchStep(torch, cfg, host, torch_device(backend), optimizer, betas)


def peak_rss(name: str, config: str, n_threads: int) -> int:
    """Peak RSS of one contender alone: a fresh process that builds it and runs 2 steps."""
    cmd = [sys.executable, str(BENCH), "train", "--peak-rss-of", name, "--configs", config, "--threads", str(n_threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"peak-RSS subprocess for {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)["peak_rss_bytes"]


def measure_peak(name: str, args) -> int:
    cfg, B, T, optimizer = step_spec(args.configs[0], args)
    torch = optional_torch() if name == "torch" else None
    with threads(args.threads[0]):
        host = GPT.init(cfg, seed=0).to_numpy() if name == "torch" else None
        step = make_step(name, torch, cfg, host, get_backend("numpy"), optimizer)
        del host
        ids, targets = batch(cfg, B, T)
        step(ids, targets)
        step(ids, targets)
    return peak_rss_bytes()


def bench_steps(args, backend, torch) -> tuple[list[dict], list[str]]:
    names = ["npgpt", "torch"] if torch is not None else ["npgpt"]
    rows, lines = [], []
    thread_counts = args.threads or ([1, 2] if backend.name == "numpy" else [None])
    for config in args.configs:
        cfg, B, T, optimizer = step_spec(config, args)
        host = GPT.init(cfg, seed=0).to_numpy() if "torch" in names else None
        ids, targets = batch(cfg, B, T)
        gemms = train_gemms(cfg, B, T)
        flops = total_flops(gemms)
        for n_threads in thread_counts:
            with threads(n_threads):
                steps = {name: make_step(name, torch, cfg, host, backend, optimizer) for name in names}
                log(f"train step {config} threads={n_threads} ...")
                first_loss = {name: step(ids, targets) for name, step in steps.items()}  # also the warm-up
                times = interleaved({name: (lambda s=s: s(ids, targets)) for name, s in steps.items()}, args.repeats, warmup=0)
                del steps
                reached = flops / min(summary(ts)["median_s"] for ts in times.values()) / 1e9
                ceiling = gemm_ceiling(gemms, backend, torch_for(torch_device(backend), required=False)[0], torch_device(backend),
                                       n_threads, reached_gflops=reached)  # fmt: skip
            rate = ceiling["gemm_ceiling_gflops"] * 1e9
            row = {"config": config, "what": "fwd+bwd+clip+AdamW" if optimizer else "fwd+bwd", "B": B, "T": T,
                   **dataclasses.asdict(cfg), "threads": n_threads, "flops_per_step": flops, **ceiling,
                   "first_step_loss": first_loss}  # fmt: skip
            for name, ts in times.items():
                s = summary(ts)
                row[name] = {**s, "tokens_per_s": B * T / s["median_s"], "fraction_of_gemm_ceiling": flops / s["median_s"] / rate}
                if args.memory and backend.name == "numpy":
                    row[name]["peak_rss_bytes"] = peak_rss(name, config, n_threads)
            line = f"train {config} threads {n_threads}: npgpt {row['npgpt']['median_s']:.3f} s ({row['npgpt']['fraction_of_gemm_ceiling']:.1%} of GEMM ceiling)"
            if "torch" in times:
                row["ratio_npgpt_over_torch"] = row["npgpt"]["median_s"] / row["torch"]["median_s"]
                line += f", torch {row['torch']['median_s']:.3f} s ({row['torch']['fraction_of_gemm_ceiling']:.1%}), npgpt/torch {row['ratio_npgpt_over_torch']:.2f}"
            if backend.name != "numpy":
                row["npgpt_peak_device_bytes"] = backend.peak_memory_bytes()
                if torch is not None:
                    row["torch_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            log(row)
            check_fractions(row)
            rows.append(row)
            lines.append(line)
    return rows, lines


# -- where a step's time goes --------------------------------------------------------------
def timed_kernels(kernels, totals: dict):
    """`kernels` with each function timed into totals[name] = [wall, cpu, calling-thread cpu, calls];
    the schedules (which run the others) are left untimed."""

    def timed(name, fn):
        def run(*args, **kwargs):
            t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
            out = fn(*args, **kwargs)
            for i, d in enumerate((time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0, 1)):
                totals[name][i] += d
            return out

        return run

    return dataclasses.replace(kernels, **{name: timed(name, getattr(kernels, name)) for name in KERNEL_NAMES if name not in SCHEDULE})


def thread_schedule() -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of the calling thread so
    far, from Linux's /proc/thread-self/schedstat; None elsewhere."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            run_ns, wait_ns = f.read().split()[:2]
    except OSError:
        return None
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def timed_pieces(kernels, pieces: list):
    """`kernels` with each piece of `over_train_batch` timed into `pieces` (one dict per
    piece: its rows, wall seconds, and from Linux's schedstat the seconds its thread ran,
    waited for a CPU, and was blocked otherwise: wall - ran - waited, mostly waits for the
    GIL), and each call's span (rows None)."""
    schedule = kernels.over_train_batch

    def over_train_batch(fn, B, T):
        def piece(b0, b1):
            t0, s0 = time.perf_counter(), thread_schedule()
            out = fn(b0, b1)
            wall, s1 = time.perf_counter() - t0, thread_schedule()
            timing = {"rows": [b0, b1], "wall_s": wall}
            if s0 is not None and s1 is not None:
                ran, waited = s1[0] - s0[0], s1[1] - s0[1]
                timing |= {"ran_s": ran, "waited_for_cpu_s": waited, "blocked_s": wall - ran - waited}
            pieces.append(timing)
            return out

        t0 = time.perf_counter()
        out = schedule(piece, B, T)
        pieces.append({"rows": None, "wall_s": time.perf_counter() - t0})
        return out

    return dataclasses.replace(kernels, over_train_batch=over_train_batch)


def piece_summary(pieces: list, steps: int, step_wall: float) -> dict:
    """Per step: the pieces' span (both calls where the batch is split: the forwards', the
    backwards'), the step's wall time outside it (the LM head between them where split, the
    pieces' gradient sum, clipping, AdamW), and each piece's timings (by rows, its forward
    and backward together)."""
    span = sum(p["wall_s"] for p in pieces if p["rows"] is None) / steps
    by_rows = defaultdict(list)
    for p in pieces:
        if p["rows"] is not None:
            by_rows[tuple(p["rows"])].append(p)
    each = [{"rows": list(rows), **{k: sum(p[k] for p in ps) / steps for k in ps[0] if k != "rows"}}
            for rows, ps in sorted(by_rows.items())]  # fmt: skip
    return {"span_s": span, "outside_s": step_wall - span, "pieces": each}


def profile_steps(args, backend) -> tuple[list[dict], list[str]]:
    rows, lines = [], []
    for config in args.configs:
        cfg, B, T, optimizer = step_spec(config, args)
        ids, targets = batch(cfg, B, T)
        for n_threads in args.threads or [1, 2]:
            with threads(n_threads):
                totals, pieces = defaultdict(lambda: [0.0, 0.0, 0.0, 0]), []
                timed = copy.copy(backend)
                timed.kernels = timed_pieces(timed_kernels(backend.kernels, totals), pieces)
                step = make_step("npgpt", None, cfg, None, timed, optimizer)
                step(ids, targets)  # warm-up
                totals.clear()
                pieces.clear()
                t0, c0, m0, u0 = time.perf_counter(), time.process_time(), time.thread_time(), usage()
                for _ in range(args.repeats):
                    step(ids, targets)
                wall, cpu, main = ((time.perf_counter() - t0), (time.process_time() - c0), (time.thread_time() - m0))
                u1 = usage()
            n = args.repeats
            kernels = {name: {"wall_s": w / n, "cpu_s": c / n, "main_thread_share": m / c if c else None, "calls": k // n}
                       for name, (w, c, m, k) in sorted(totals.items(), key=lambda item: -item[1][1])}  # fmt: skip
            untimed = [wall - sum(v[0] for v in totals.values()), cpu - sum(v[1] for v in totals.values()),
                       main - sum(v[2] for v in totals.values())]  # fmt: skip
            kernels["untimed"] = {"wall_s": untimed[0] / n, "cpu_s": untimed[1] / n,
                                  "main_thread_share": untimed[2] / untimed[1] if untimed[1] > 0 else None}  # fmt: skip
            rows.append({"config": config, "B": B, "T": T, **dataclasses.asdict(cfg), "threads": n_threads, "steps": n,
                         "step_wall_s": wall / n, "step_cpu_s": cpu / n, "main_thread_share": main / cpu if cpu else None,
                         "step_system_cpu_s": (u1[0] - u0[0]) / n, "step_minor_faults": (u1[1] - u0[1]) / n,
                         "kernels": kernels, "train_pieces": piece_summary(pieces, n, wall / n)})  # fmt: skip
            top = ", ".join(f"{k} {v['cpu_s']:.2f}" for k, v in list(kernels.items())[:4])
            split = rows[-1]["train_pieces"]
            each = "; ".join(" ".join(f"{k.removesuffix('_s')} {v:.3f}" for k, v in p.items() if k != "rows") for p in split["pieces"])
            lines.append(f"profile {config} threads {n_threads}: step {wall / n:.3f} s wall, {cpu / n:.3f} s CPU "
                         f"({main / max(cpu, 1e-9):.0%} on the calling thread; system {(u1[0] - u0[0]) / n:.3f} s, "
                         f"{(u1[1] - u0[1]) / n:.0f} page faults); CPU s: {top}; pieces' span "
                         f"{split['span_s']:.3f} s, outside it {split['outside_s']:.3f} s; each piece: {each}")  # fmt: skip
    return rows, lines


def usage() -> tuple[float, int]:
    """(system CPU seconds, minor page faults) of this process so far: fresh memory's
    first touches, which a step that reuses freed memory does not pay."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_stime, r.ru_minflt


# -- the recipe race -------------------------------------------------------------------------


def recipe_race(args, backend, torch) -> dict:
    from npgpt.data import BatchSampler, split_tokens
    from npgpt.tokenizer import CharTokenizer

    r = RECIPE
    text = Path(args.corpus).read_text("utf-8")
    tok = CharTokenizer.train(text)
    train, val = split_tokens(np.asarray(tok.encode(text)), 0.1)
    cfg = GPTConfig(vocab_size=tok.n_vocab, n_ctx=r["block"], n_embd=r["n_embd"], n_head=r["n_head"], n_layer=r["n_layer"])
    host = GPT.init(cfg, seed=1337).to_numpy() if torch is not None else None
    train_data = BatchSampler(train, r["batch"], r["block"], seed=1337)
    val_batches = [BatchSampler(val, r["batch"], r["block"], seed=1337, split="val").batch(i) for i in range(r["val_batches"])]
    names = ["npgpt", "torch"] if torch is not None else ["npgpt"]
    n_threads = args.threads[0] if args.threads else None
    result = {"recipe": "shakespeare-char", **{k: v for k, v in r.items() if k != "betas"}, "vocab": tok.n_vocab,
              "threads": n_threads, "backend": backend.name, "train_tokens": len(train), "val_tokens": len(val)}  # fmt: skip
    with threads(n_threads):
        steps = {name: make_step(name, torch, cfg, host, backend, True, r["betas"], seed=1337) for name in names}
        wall = dict.fromkeys(names, 0.0)
        last = {}
        for chunk_start in range(0, r["iters"], r["chunk"]):
            for name, step in steps.items():
                start = time.perf_counter()
                for i in range(chunk_start, min(chunk_start + r["chunk"], r["iters"])):
                    last[name] = step(*train_data.batch(i), lr=cosine_lr(i, r["lr"], r["min_lr"], r["warmup"], r["iters"]))
                wall[name] += time.perf_counter() - start
            if (chunk_start + r["chunk"]) % 100 == 0:
                log(f"recipe step {chunk_start + r['chunk']}: " + ", ".join(f"{n} loss {last[n]:.3f} {wall[n]:.1f}s" for n in names))  # fmt: skip
        for name, step in steps.items():
            result[name] = {"train_wall_s": wall[name], "final_train_loss": last[name], "val_loss": step.val_loss(val_batches)}
    if "torch" in names:
        result["wall_ratio_npgpt_over_torch"] = wall["npgpt"] / wall["torch"]
        result["val_loss_diff_npgpt_minus_torch"] = result["npgpt"]["val_loss"] - result["torch"]["val_loss"]
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench.py train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="numpy", help="npgpt backend (default numpy; cupy: the GPU, vs PyTorch CUDA)")
    ap.add_argument("--vs", choices=["torch"], help="also run the identical PyTorch model, interleaved")
    ap.add_argument("--configs", nargs="+", default=["a", "b", "c"], choices=list(CONFIGS), help="step-time configs (default a b c)")
    ap.add_argument("--batch", type=int, help="override the configs' batch size B")
    ap.add_argument("--seq", type=int, help="override the configs' sequence length T")
    ap.add_argument("--threads", type=int, nargs="+", help="thread counts (default 1 2 on numpy, as-is elsewhere)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-contender peak-RSS subprocesses")
    ap.add_argument("--recipe", choices=["shakespeare-char"], help="run the recipe race instead of the step benchmark")
    ap.add_argument("--corpus", default=str(SHAKESPEARE), help="tinyshakespeare.txt for the recipe")
    ap.add_argument("--profile", action="store_true", help="npgpt alone: wall and CPU seconds per kernel (see above)")
    ap.add_argument("--peak-rss-of", choices=["npgpt", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_rss_of:
        print(json.dumps({"peak_rss_bytes": measure_peak(args.peak_rss_of, args)}))
        return 0
    backend = get_backend(args.backend)
    device = torch_device(backend)
    torch, why_not = torch_for(device, required=True) if args.vs == "torch" else (None, "not requested (--vs torch)")
    info = {"backend": backend.name, "torch": torch.__version__ if torch else f"skipped: {why_not}"}
    if args.profile:
        rows, lines = profile_steps(args, backend)
        emit({"benchmark": "train-profile", **info, "dtype": "float32", "results": rows}, lines)
    elif args.recipe:
        result = recipe_race(args, backend, torch)
        line = f"recipe: npgpt {result['npgpt']['train_wall_s']:.1f} s, val loss {result['npgpt']['val_loss']:.5f}"
        if torch is not None:
            line += f"; torch {result['torch']['train_wall_s']:.1f} s, val loss {result['torch']['val_loss']:.5f}; wall npgpt/torch {result['wall_ratio_npgpt_over_torch']:.2f}"
        emit({"benchmark": "train-recipe", **info, **result}, [line])
    else:
        rows, lines = bench_steps(args, backend, torch)
        emit({"benchmark": "train-step", **info, "dtype": "float32", "results": rows}, lines)
    return 0

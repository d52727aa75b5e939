"""Evaluation benchmark: the whole `python -m npgpt.eval` run, as a user starts it (a
subprocess: start-up, reading and encoding the text, scoring), on a text file with the
shipped model, at each thread count asked for, round-robin. Reports each run's wall time,
the time eval reports for scoring alone, tokens/s, the CPU seconds the run used (user +
system) and so the cores it had on average (a busy machine gives fewer than its threads),
and /proc/loadavg before each run. `--workers threads processes` runs eval's
--workers ways (threads in one process; forked processes of one thread each) round-robin;
the default is eval's own default, auto. `--loops default numpy` runs each way with the
compiled loops (where numba is installed) and with NPGPT_NUMBA=0 (NumPy's passes), round-robin.

    python tools/bench.py eval [--threads 2] [--repeats 3] [--workers threads processes] [--loops default numpy]
                               [--stride N] [--data FILE]

`--kernels-vs REF` measures the kernels instead, where whole runs are too noisy to show a
few percent: the first --max-tokens tokens (default 4097) scored in this process on one
thread, --repeats times (default 30), alternating (ABBA) NumPy's kernel set as git REF has
it (npgpt/kernels/numpy_fast.py at REF) with the working tree's; process CPU time per
token of each, the median of the per-pair ratios, and both losses.

    python tools/bench.py eval --kernels-vs main [--max-tokens 4097] [--repeats 30]
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
             max_tokens: int | None = None, loops: str = "default") -> dict:
    """One `python -m npgpt.eval` run; loops "numpy": with NPGPT_NUMBA=0 (NumPy's passes only)."""
    command = [sys.executable, "-m", "npgpt.eval", "--weights", weights, "--data", str(data), "--threads", str(threads),
               "--json", "--quiet"] + ([] if stride is None else ["--stride", str(stride)]) \
        + ["--workers", workers] + ([] if max_tokens is None else ["--max-tokens", str(max_tokens)])  # fmt: skip
    load = load_average()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = dict(os.environ, NPGPT_NUMBA="0") if loops == "numpy" else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise BenchError(f"npgpt.eval failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    result = json.loads(done.stdout)
    return {"threads": threads, "workers": workers, "loops": loops, "wall_s": wall, "scoring_s": result["seconds"], "cpu_s": cpu, "cores_used": cpu / wall,
            "loadavg_1_5_15_before": load,
            "tokens": result["tokens_evaluated"], "tokens_per_s": result["tokens_evaluated"] / result["seconds"],
            "stride": result["stride"], "context": result["context"], "loss": result["loss"]}  # fmt: skip


def kernels_vs(ref: str, weights: str, data: Path, max_tokens: int, repeats: int) -> dict:
    """Scoring CPU time per token with git `ref`'s numpy_fast kernels (and its compiled loops,
    where this run has numba's) and the working tree's, ABBA."""
    import importlib.util
    import tempfile

    from npgpt.backend import NumpyBackend
    from npgpt.eval import perplexity, read_ids
    from npgpt.kernels import numpy_fast
    from npgpt.kernels.threads import on_one_thread
    from npgpt.weights import load_model

    root = Path(__file__).resolve().parents[1]

    def at_ref(name: str, required: bool = True):  # npgpt/kernels/<name>.py as git ref has it, imported
        shown = subprocess.run(["git", "-C", str(root), "show", f"{ref}:npgpt/kernels/{name}.py"], capture_output=True, text=True)
        if shown.returncode != 0:
            if not required:
                return None
            raise BenchError(f"git show {ref}:npgpt/kernels/{name}.py failed ({shown.stderr.strip()}); give a commit or branch that has it")
        path = Path(folder) / f"{name}_at_ref.py"
        path.write_text(shown.stdout, "utf-8")
        spec = importlib.util.spec_from_file_location(f"{name}_at_ref", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    with tempfile.TemporaryDirectory() as folder:  # kept while the ref's modules run (numba caches beside them)
        fast_at_ref = at_ref("numpy_fast")
        if numpy_fast.compiled_loops() is not None:  # the ref's own compiled loops, where it has them
            loops_at_ref = at_ref("compiled", required=False)
            fast_at_ref.compiled_loops = lambda: loops_at_ref
        models = {name: load_model(weights, NumpyBackend(kernels), None, say=lambda message: None)
                  for name, kernels in ((ref, fast_at_ref.KERNELS), ("working tree", numpy_fast.KERNELS))}  # fmt: skip
        ids = read_ids(models[ref][1], data, max_tokens)
        per_token, losses = {name: [] for name in models}, {}
        load = load_average()
        for repeat in range(repeats):
            for name in (list(models) if repeat % 2 == 0 else list(models)[::-1]):
                with on_one_thread():  # the kernels and BLAS on this thread
                    start = time.process_time()
                    result = perplexity(models[name][0], ids)
                    per_token[name].append((time.process_time() - start) / result["tokens_evaluated"] * 1e6)
                losses[name] = result["loss"]
    ratios = [ours / theirs for ours, theirs in zip(per_token["working tree"], per_token[ref])]
    return {"benchmark": "eval-kernels", "ref": ref, "weights": weights, "data": data.name, "tokens": len(ids),
            "threads": 1, "repeats": repeats, "loadavg_1_5_15_before": load, "loss": losses,
            "cpu_us_per_token": per_token, "median_cpu_us_per_token": {name: statistics.median(v) for name, v in per_token.items()},
            "median_ratio_working_tree_to_ref": statistics.median(ratios), "ratios": ratios}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.py eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts (default 2)")
    parser.add_argument("--repeats", type=int, help="runs per thread count (default 3; with --kernels-vs: pairs, default 30)")
    parser.add_argument("--kernels-vs", metavar="REF", help="instead: the kernels of git REF against the working tree's, "
                                                            "in this process on one thread (see the module docstring)")
    parser.add_argument("--workers", nargs="+", choices=("auto", "threads", "processes"), default=["auto"],
                        help="eval's --workers: auto (eval's default), threads in one process and/or processes, round-robin")
    parser.add_argument("--loops", nargs="+", choices=("default", "numpy"), default=["default"],
                        help="default: the compiled loops where numba is installed; numpy: NPGPT_NUMBA=0 (NumPy's passes); "
                             "both: round-robin")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, help="eval's --max-tokens (default: the whole text)")
    parser.add_argument("--stride", type=int, help="eval's --stride (default: eval's default)")
    parser.add_argument("--weights", default="shakespeare", help="eval's --weights (default shakespeare, the shipped model)")
    parser.add_argument("--data", type=Path, default=DATA / "corpora" / "tinyshakespeare.txt", help="text file to score")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        raise BenchError(f"no text file at {args.data}; give --data FILE or set NPGPT_DATA")
    if args.kernels_vs:
        report = kernels_vs(args.kernels_vs, args.weights, args.data, args.max_tokens or 4097, args.repeats or 30)
        medians = report["median_cpu_us_per_token"]
        emit(report, [f"{name}: median {value:.1f} us CPU per token" for name, value in medians.items()]
             + [f"working tree / {args.kernels_vs}: median per-pair ratio {report['median_ratio_working_tree_to_ref']:.3f}; "
                f"losses {report['loss']}"])  # fmt: skip
        return 0
    args.repeats = args.repeats or 3
    runs = []
    kinds = [(n, w, loops) for n in args.threads for w in args.workers if n > 1 or w != "processes" for loops in args.loops]
    for repeat in range(args.repeats):
        for n, workers, loops in kinds:
            runs.append(run_eval(args.weights, args.data, n, args.stride, workers, args.max_tokens, loops))
            log(f"run {repeat + 1}/{args.repeats}, {n} thread(s), {workers}, {loops} loops: {runs[-1]['wall_s']:.1f} s wall, "
                f"{runs[-1]['tokens_per_s']:,.0f} tokens/s, {runs[-1]['cores_used']:.2f} cores used, "
                f"loadavg before {runs[-1]['loadavg_1_5_15_before']}")  # fmt: skip
    by_threads = {}
    for n, workers, loops in kinds:
        mine = [r for r in runs if (r["threads"], r["workers"], r["loops"]) == (n, workers, loops)]
        name = (str(n) if workers == "threads" else f"{n} {workers}") + ("" if loops == "default" else f" {loops}-loops")
        by_threads[name] = {"median_wall_s": statistics.median(r["wall_s"] for r in mine), "min_wall_s": min(r["wall_s"] for r in mine),
                              "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine)}  # fmt: skip
    report = {"benchmark": "eval", "weights": args.weights, "data": args.data.name, "runs": runs, "by_threads": by_threads}
    emit(report, [f"{n if ' ' in n else n + ' thread(s)'}: median {s['median_wall_s']:.1f} s wall (min {s['min_wall_s']:.1f}), "
                  f"{s['median_tokens_per_s']:,.0f} tokens/s" for n, s in by_threads.items()])  # fmt: skip
    return 0

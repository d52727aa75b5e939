"""Forward-pass benchmark: GPT-2 124M shape, random weights (GPT-2's init), float32, NumPy.

For each shape (default B=1,T=1024 and B=8,T=128) and thread count (default 1, 2) it
reports tokens/s, the fraction of the GEMM ceiling reached, and with --vs torch the same
forward through transformers' GPT2LMHeadModel on the same weights, interleaved, and the
time ratio npgpt / torch.

The ceiling is measured in the same run with up to the same thread count on the forward's own
GEMM shapes: for each, the best of NumPy's matmul and (if installed) torch.matmul,
weighted by FLOPs (benchlib.gemm_ceiling). FLOPs are benchlib.forward_gemms': the
linear layers, the LM head, and attention's two products over the causal triangle only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from benchlib import (check_fractions, emit, forward_gemms, gemm_ceiling, interleaved, log, model_config,
                      optional_torch, peak_rss_bytes, summary, threads, torch_for, torch_model, total_flops)  # fmt: skip

from npgpt.model import GPT

BENCH = Path(__file__).resolve().parent / "bench.py"


def npgpt_peak_rss(preset: str, B: int, T: int, n_threads: int) -> int:
    """Peak RSS of npgpt alone: a fresh process that builds the model and runs one forward."""
    cmd = [sys.executable, str(BENCH), "forward", "--preset", preset, "--peak-rss-of", f"{B}x{T}", "--threads", str(n_threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"peak-RSS subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)["peak_rss_bytes"]


def shape(text: str) -> tuple[int, int]:
    try:
        B, T = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BxT, e.g. 8x128") from None
    return B, T


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench.py forward", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vs", choices=["torch"], help="also run the same forward through PyTorch/transformers")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="gpt2", help="model shape: a GPT-2 preset, or tiny (smoke runs)")
    ap.add_argument("--shapes", type=shape, nargs="+", default=[(1, 1024), (8, 128)], help="BxT (default 1x1024 8x128)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-RSS subprocess")
    ap.add_argument("--peak-rss-of", type=shape, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    cfg = model_config(args.preset)
    if args.peak_rss_of:
        B, T = args.peak_rss_of
        with threads(args.threads[0]):
            GPT.init(cfg, seed=0).forward(np.zeros((B, T), dtype=np.int64))
        print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
        return 0
    for B, T in args.shapes:
        if T > cfg.n_ctx:
            raise ValueError(f"shape {B}x{T} is longer than the model's context {cfg.n_ctx}")

    model = GPT.init(cfg, seed=0)
    host = model.to_numpy()
    weights_bytes = sum(v.nbytes for v in host.values())
    torch = torch_for("cpu", required=True)[0] if args.vs == "torch" else optional_torch()  # the GEMM ceiling uses it too
    peer = torch_model(torch, cfg, host) if args.vs == "torch" else None
    rng = np.random.default_rng(0)
    results, lines = [], []
    for n_threads in args.threads:
        with threads(n_threads):
            for B, T in args.shapes:
                ids = rng.integers(0, cfg.vocab_size, (B, T))
                contenders = {"npgpt": lambda: model.forward(ids)}
                if peer is not None:
                    tids = torch.from_numpy(ids)

                    def run_torch():
                        with torch.inference_mode():
                            peer(tids)

                    contenders["torch"] = run_torch
                log(f"forward B={B} T={T} threads={n_threads} ...")
                times = interleaved(contenders, args.repeats)
                gemms = forward_gemms(cfg, B, T)
                flops = total_flops(gemms)
                reached = flops / min(summary(ts)["median_s"] for ts in times.values()) / 1e9
                ceiling = gemm_ceiling(gemms, model.backend, torch, n_threads=n_threads, reached_gflops=reached)
                rate = ceiling["gemm_ceiling_gflops"] * 1e9
                row = {"B": B, "T": T, "threads": n_threads, **ceiling}
                for name, ts in times.items():
                    s = summary(ts)
                    row[name] = {**s, "tokens_per_s": B * T / s["median_s"],
                                 "fraction_of_gemm_ceiling": flops / s["median_s"] / rate}  # fmt: skip
                line = f"forward B{B} T{T} threads {n_threads}: npgpt {row['npgpt']['median_s']:.3f} s ({row['npgpt']['fraction_of_gemm_ceiling']:.1%} of GEMM ceiling)"
                if peer is not None:
                    row["ratio_npgpt_over_torch"] = row["npgpt"]["median_s"] / row["torch"]["median_s"]
                    line += f", torch {row['torch']['median_s']:.3f} s ({row['torch']['fraction_of_gemm_ceiling']:.1%}), npgpt/torch {row['ratio_npgpt_over_torch']:.2f}"
                if args.memory:
                    activations = 4 * B * T * cfg.vocab_size  # the float32 logits dominate
                    row["npgpt"]["peak_rss_bytes"] = rss = npgpt_peak_rss(args.preset, B, T, n_threads)
                    row["npgpt"]["peak_rss_over_weights_plus_logits"] = rss / (weights_bytes + activations)
                log(row)
                check_fractions(row)
                results.append(row)
                lines.append(line)
    emit({
        "benchmark": "forward", "model": args.preset, "dtype": "float32",
        "flops_per_forward": {f"B{B}_T{T}": total_flops(forward_gemms(cfg, B, T)) for B, T in args.shapes},
        "weights_bytes": weights_bytes, "results": results,
    }, lines)  # fmt: skip
    return 0

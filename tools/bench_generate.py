"""Decoding benchmark: GPT-2 124M shape, random weights (GPT-2's init), float32, B=1, greedy.

For each thread count (default 1, 2; --backend cupy: the GPU, one run) it times,
interleaved in one process:
  cached     npgpt.generate.generate_ids with the KV cache (prompt 32, 128 new tokens), on
             the model in `decoding_layout` (as `python -m npgpt.generate` runs it)
  recompute  the same without a cache: the whole context is recomputed every step
             (as picoGPT does); slow, so it runs --recompute-repeats times only
  cached_default_layout  (--ab-layout) the same on the default, C-ordered weights
  torch      (--vs torch) transformers GPT2LMHeadModel.generate on the same weights
             (on the CPU beside NumPy, on the GPU beside --backend cupy)
and reports tokens/s = new tokens / whole call (prefill included, as for transformers),
and npgpt's decode-only rate: the steps after the first token, median of the timed calls.

Decoding one token reads every weight once (the LM head reads all of wte), so the ceiling
is streaming bandwidth, measured in the same run with up to the same thread count: the best of
a GEMV over max(4 x last-level cache, 512 MiB) through NumPy's BLAS (or the backend's
matmul) and, under --vs torch, torch.mv (benchlib.bandwidth).
A ceiling sample is taken before each round of the timed contenders (the warm-up round
included) and one after the last (ceiling, run, ceiling, run, ..., ceiling), so that the
machine's swings (on a shared machine the same GEMV streamed 26-40 GB/s minutes apart) hit
each run and its ceiling alike. `bandwidth_ceiling_gb_s` is the best sample (each
per-library figure its best), `bandwidth_ceiling_samples_gb_s` all of them in order.
`fraction_of_bandwidth_ceiling` = weight bytes read per token x tokens/s (median run) /
the best sample's bandwidth (the KV cache's reads, ~1% here, are not counted);
`fraction_of_adjacent_ceiling` = each timed run's tokens/s over the ceiling of the larger of
the two samples next to it (before and after), per run and their median (min, max);
`decode_only_*` the same for the decode steps alone. Only weights of at least 4 x the last-level
cache stream from memory; smaller ones (--preset tiny) stay in cache, where memory
bandwidth bounds nothing, so no fraction is reported for them.

Time to first token: a 1024-token prompt (the full context), prefill and the first token,
npgpt vs transformers' generate(max_new_tokens=1).

--step-profile N (NumPy): N greedy decode steps timed one by one after the same prompt,
each split into the one call of the compiled step where the kernels have it (`decode_step`:
every weight read in it), else its products (the kernels' linear_forward, all 49 for GPT-2
124M, timed one by one), and the rest (op by op: attention, LayerNorm, GELU, bias adds, the
KV cache, Python; with the compiled step: Python and the argmax): medians.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from benchlib import (agreement, bandwidth_meter, check_fractions, emit, interleaved, llc_bytes, log, model_config, npgpt_generate,
                      peak_rss_bytes, summary, threads, torch_device, torch_for, torch_generate, torch_model)  # fmt: skip

from npgpt.backend import NumpyBackend, get_backend
from npgpt.generate import GenerationStats, decoding_layout, last_logits
from npgpt.model import GPT


def weight_bytes_per_token(host: dict[str, np.ndarray], n_ctx: int) -> int:
    """Bytes of weights one decode step reads: everything once (wte twice counts once: the
    LM head streams all of it, the embedding lookup one row), wpe only one row."""
    wpe = host["wpe.weight"]
    return sum(v.nbytes for v in host.values()) - wpe.nbytes + wpe.nbytes // n_ctx


def tokens_report(seconds: list[float], new_tokens: int, ceiling_tokens_per_s: float | None) -> dict:
    s = summary(seconds)
    rate = new_tokens / s["median_s"]
    report = {**s, "tokens_per_s": rate}
    if ceiling_tokens_per_s:
        report["fraction_of_bandwidth_ceiling"] = rate / ceiling_tokens_per_s
    return report


def per_run(rates: list[float], ceilings: list[float]) -> dict:
    """Each run's tokens/s over the ceiling's tokens/s measured next to it: the fractions
    in run order, their median, min and max."""
    fractions = [rate / ceiling for rate, ceiling in zip(rates, ceilings, strict=True)]
    return {"per_run": fractions, "median": float(np.median(fractions)), "min": min(fractions), "max": max(fractions)}


def step_profile(model: GPT, prompt: np.ndarray, steps: int) -> dict:
    """Medians over `steps` greedy decode steps after `prompt` (NumPy): a step; the part
    the kernels run in one call where they can (`decode_step`, the compiled step: the
    embedding, every block, the final LayerNorm and the LM head); else its products (the
    kernels' linear_forward, each timed); the rest; in ms, with the GB/s of the weights
    read in the one call or by the products. The timed kernel set runs on a second backend
    that shares the model's weights."""
    kernels, times = model.backend.kernels, {"products": [0.0], "compiled": [0.0]}  # one sum per step (the prompt's first)
    fused = [False]

    def timed(name, kernel):
        def run(*args):
            start = time.perf_counter()
            result = kernel(*args)
            times[name][-1] += time.perf_counter() - start
            if name == "compiled" and result is not None:
                fused[0] = True
            return result

        return run

    timed_model = GPT(model.config, model.params, NumpyBackend(kernels.replace(
        "timed", linear_forward=timed("products", kernels.linear_forward), linear_backward=kernels.linear_backward,
        decode_step=timed("compiled", kernels.decode_step))))  # fmt: skip
    cache, seconds = timed_model.new_cache(1), []
    token = int(np.argmax(last_logits(timed_model, prompt.tolist(), cache)))
    fused[0] = False
    for name in times:
        times[name].clear()
    for _ in range(steps):
        for name in times:
            times[name].append(0.0)
        start = time.perf_counter()
        token = int(np.argmax(last_logits(timed_model, [token], cache)))
        seconds.append(time.perf_counter() - start)
    weight_bytes = sum(v.nbytes for k, v in model.params.items() if v.ndim == 2 and k != "wpe.weight")
    report = {"steps": steps, "step_ms": 1e3 * float(np.median(seconds)), "compiled_step": fused[0]}
    part = "compiled" if fused[0] else "products"
    spent = float(np.median(times[part]))
    report |= {f"{part}_ms": 1e3 * spent, f"{part}_gb_s": weight_bytes / spent / 1e9}
    rest = np.subtract(seconds, np.add(times["products"], times["compiled"]))
    return report | {"rest_ms": 1e3 * float(np.median(rest))}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench.py generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="numpy", help="npgpt backend (default numpy; cupy: the GPU, vs PyTorch CUDA)")
    ap.add_argument("--vs", choices=["torch"], help="also run transformers' generate on the same weights")
    ap.add_argument("--threads", type=int, nargs="+", help="thread counts (default 1 2 on numpy, as-is elsewhere)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of cached generation (and transformers)")
    ap.add_argument("--recompute-repeats", type=int, default=1, help="timed runs of the slow no-cache path (0: skip)")
    ap.add_argument("--ttft-tokens", type=int, default=1024, help="prompt length for time to first token (0: skip)")
    ap.add_argument("--ttft-repeats", type=int, default=7,
                    help="timed runs of time to first token, each npgpt's then transformers' (default 7: the median of 3 swung 0.93-1.10)")  # fmt: skip
    ap.add_argument("--ab-layout", action="store_true",
                    help="also time cached decoding on the default (C-ordered) weights, interleaved (A/B of `decoding_layout`; +~270 MB)")
    ap.add_argument("--preset", default="gpt2", help="model shape: a GPT-2 preset, or tiny (smoke runs)")
    ap.add_argument("--step-profile", type=int, default=0, metavar="STEPS",
                    help="NumPy: also time STEPS decode steps one by one, split into products and the rest (medians)")  # fmt: skip
    args = ap.parse_args(argv)

    backend = get_backend(args.backend)
    thread_counts = args.threads or ([1, 2] if backend.name == "numpy" else [None])
    cfg = model_config(args.preset)
    if args.step_profile and (backend.name != "numpy" or args.prompt_tokens + args.step_profile > cfg.n_ctx):
        raise ValueError("--step-profile needs the numpy backend and prompt tokens + steps within the context")
    if args.vs and args.prompt_tokens + args.new_tokens > cfg.n_ctx:  # transformers' positions end at n_ctx: no sliding window there
        raise ValueError(f"prompt + new tokens ({args.prompt_tokens} + {args.new_tokens}) exceed the model's context "
                         f"{cfg.n_ctx}; lower --prompt-tokens/--new-tokens")  # fmt: skip
    if max(args.prompt_tokens, args.ttft_tokens) > cfg.n_ctx:
        raise ValueError(f"prompts longer than the model's context {cfg.n_ctx}; lower --prompt-tokens/--ttft-tokens")
    model = GPT.init(cfg, backend, seed=0)
    host = model.to_numpy()
    bytes_per_token = weight_bytes_per_token(host, cfg.n_ctx)
    device = torch_device(backend)
    torch, why_not = torch_for(device, required=True) if args.vs == "torch" else (None, "not requested (--vs torch)")
    hf = torch_model(torch, cfg, host, device) if torch is not None else None
    del host  # (its arrays are the model's: the layout's copies replace them, no extra memory)
    default_layout = GPT(cfg, dict(model.params), backend) if args.ab_layout else None  # keeps the replaced arrays
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_tokens)
    long_prompt = rng.integers(0, cfg.vocab_size, max(args.ttft_tokens, 1))

    meter = bandwidth_meter(backend, torch, device)  # its 512 MiB matrix held for the samples between the runs
    results, lines = [], []
    for n_threads in thread_counts:
        with threads(n_threads):
            decoding_layout(model, n_threads)  # as the CLI decodes on n_threads
            samples = []  # bandwidth reports: before each call of the contenders (warm-up included) and after the last

            def ceiling_sample():
                samples.append(meter(n_threads))

            decode_seconds = []  # per cached call: its decode steps (after the first token)

            def cached():
                stats = GenerationStats()
                ids = npgpt_generate(model, prompt, args.new_tokens, stats=stats)()
                decode_seconds.append(stats.generate_seconds)
                return ids

            contenders = {"ceiling": ceiling_sample, "cached": cached}
            if default_layout is not None:
                contenders["cached_default_layout"] = npgpt_generate(default_layout, prompt, args.new_tokens)
            if hf is not None:
                contenders["torch"] = torch_generate(torch, hf, prompt, args.new_tokens, device)
            log(f"generate threads={n_threads}: (bandwidth, cached{' vs torch' if hf else ''}) x{args.repeats} ...")
            times = interleaved(contenders, args.repeats)
            ceiling_sample()
            del times["ceiling"], contenders["ceiling"]
            row = {"threads": n_threads, **{k: max(s[k] for s in samples) for k in samples[0]}}  # each figure's best sample
            gb_s = [s["bandwidth_ceiling_gb_s"] for s in samples]
            row["bandwidth_ceiling_samples_gb_s"] = gb_s
            streams = bytes_per_token >= 4 * llc_bytes()  # else the weights stay in cache: no bandwidth bound
            ceiling = row["bandwidth_ceiling_gb_s"] * 1e9 / bytes_per_token if streams else None
            row["weights_stream_from_memory"] = streams
            row["ceiling_tokens_per_s"] = ceiling  # tokens/s if every weight byte streamed at the bandwidth
            # timed run i ran between samples i + 1 and i + 2 (sample 0 came before the warm-up calls):
            # its ceiling is the larger of the two measured next to it
            adjacent = [max(gb_s[i + 1], gb_s[i + 2]) * 1e9 / bytes_per_token for i in range(args.repeats)]
            for name, seconds in times.items():
                row[name] = tokens_report(seconds, args.new_tokens, ceiling)
                if streams:
                    row[name]["fraction_of_adjacent_ceiling"] = per_run([args.new_tokens / t for t in seconds], adjacent)
            decode = (args.new_tokens - 1) / float(np.median(decode_seconds[1:]))  # the timed calls (not the warm-up)
            row["cached"]["decode_only_tokens_per_s"] = decode
            line = f"generate threads {n_threads}: bandwidth {row['bandwidth_ceiling_gb_s']:.1f} GB/s; cached {row['cached']['tokens_per_s']:.1f} tok/s"
            if ceiling:
                row["cached"]["decode_only_fraction_of_bandwidth_ceiling"] = decode / ceiling
                row["cached"]["decode_only_fraction_of_adjacent_ceiling"] = per_run(
                    [(args.new_tokens - 1) / t for t in decode_seconds[1:]], adjacent)  # fmt: skip
                line += f" ({row['cached']['fraction_of_bandwidth_ceiling']:.1%} of ceiling, decode only {decode:.1f} tok/s = {decode / ceiling:.1%})"
                pairs = row["cached"]["fraction_of_adjacent_ceiling"]
                line += (f"; against the ceiling next to each run ({min(gb_s):.1f}-{max(gb_s):.1f} GB/s): median "
                         f"{pairs['median']:.1%} ({pairs['min']:.1%}-{pairs['max']:.1%}), decode only "
                         f"{row['cached']['decode_only_fraction_of_adjacent_ceiling']['median']:.1%}")  # fmt: skip
            if default_layout is not None:
                row["speedup_decoding_layout"] = row["cached"]["tokens_per_s"] / row["cached_default_layout"]["tokens_per_s"]
                line += f"; decoding layout {row['speedup_decoding_layout']:.3f}x the default layout's tok/s"
            if args.step_profile:
                log(f"generate threads={n_threads}: {args.step_profile} decode steps one by one ...")
                row["decode_step_profile"] = profile = step_profile(model, prompt, args.step_profile)
                part = "compiled" if profile["compiled_step"] else "products"
                line += (f"; a step {profile['step_ms']:.2f} ms: {'the compiled call' if profile['compiled_step'] else 'products'} "
                         f"{profile[part + '_ms']:.2f} ms ({profile[part + '_gb_s']:.1f} GB/s), the rest {profile['rest_ms']:.2f} ms")  # fmt: skip
            if args.recompute_repeats:
                log(f"generate threads={n_threads}: recompute x{args.recompute_repeats} ...")
                seconds = interleaved({"recompute": npgpt_generate(model, prompt, args.new_tokens, use_cache=False)},
                                      args.recompute_repeats, warmup=0)["recompute"]  # fmt: skip
                row["recompute"] = tokens_report(seconds, args.new_tokens, ceiling)
                row["speedup_cached_over_recompute"] = row["cached"]["tokens_per_s"] / row["recompute"]["tokens_per_s"]
            if hf is not None:
                row["speedup_cached_over_torch"] = row["cached"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
                row["greedy_tokens_agreeing_with_torch"] = agreement(contenders["cached"](), contenders["torch"]())
                line += f"; transformers {row['torch']['tokens_per_s']:.1f} tok/s, npgpt/transformers speed {row['speedup_cached_over_torch']:.2f}x"
            if args.ttft_tokens:
                log(f"generate threads={n_threads}: time to first token, {args.ttft_tokens}-token prompt ...")
                first = {"npgpt": npgpt_generate(model, long_prompt, 1)}
                if hf is not None:
                    first["torch"] = torch_generate(torch, hf, long_prompt, 1, device)
                runs = interleaved(first, args.ttft_repeats)
                ttft = {name: summary(s) for name, s in runs.items()}
                if hf is not None:
                    ttft["ratio_npgpt_over_torch"] = ttft["npgpt"]["median_s"] / ttft["torch"]["median_s"]
                    pairs = [a / b for a, b in zip(runs["npgpt"], runs["torch"])]  # each run against the torch run right after it
                    ttft["ratio_per_pair"] = {"median": float(np.median(pairs)), "min": min(pairs), "max": max(pairs)}
                    line += f"; TTFT npgpt/torch {ttft['ratio_npgpt_over_torch']:.2f} (pairs {min(pairs):.2f}-{max(pairs):.2f})"
                row["time_to_first_token"] = {"prompt_tokens": args.ttft_tokens, **ttft}
            log(row)
            check_fractions(row)
            results.append(row)
            lines.append(line)
    report = {
        "benchmark": "generate", "backend": backend.name, "model": args.preset, "dtype": "float32", "batch": 1,
        "sampling": "greedy", "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "weight_bytes_read_per_token": bytes_per_token, "torch": torch.__version__ if torch else f"skipped: {why_not}",
        "results": results,
    }  # fmt: skip
    if backend.name == "numpy":
        report["peak_rss_bytes"] = peak_rss_bytes()
    else:
        report["npgpt_peak_device_bytes"] = backend.peak_memory_bytes()
        if torch is not None:
            report["torch_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    emit(report, lines)
    return 0

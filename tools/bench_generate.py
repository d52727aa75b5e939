"""Decoding benchmark: GPT-2 124M shape, random weights, float32, B=1, greedy.

For each thread count (1, 2) it times, interleaved in one process:
  cached     npgpt.generate.generate_ids with the KV cache (prompt 32, 128 new tokens)
  recompute  the same without a cache: the whole context is recomputed every step
             (as picoGPT does); slow, so it runs --recompute-repeats times only
  torch      (--vs torch) transformers GPT2LMHeadModel.generate on the same weights
and reports tokens/s = new tokens / whole call (prefill included, as for transformers).

Decoding one token reads every weight once (the LM head reads all of wte), so the ceiling
is memory bandwidth: it is measured in the same run at the same thread count (summing a
512 MiB array) and `fraction_of_bandwidth_ceiling` = weight bytes read per token / time per
token / bandwidth (the KV cache's reads, ~1% here, are not counted).

Time to first token: a 1024-token prompt (the full context), prefill and the first token,
npgpt vs transformers' generate(max_new_tokens=1).
"""

from __future__ import annotations

import argparse

import numpy as np

from benchlib import emit, interleaved, load_average, log, memory_bandwidth, peak_rss_bytes, summary, threads
from npgpt.config import GPTConfig
from npgpt.generate import GenerationStats, generate_ids
from npgpt.model import GPT, init_params
from npgpt.sampling import SamplingConfig

GREEDY = SamplingConfig(greedy=True)


def weight_bytes_per_token(host: dict[str, np.ndarray], cfg: GPTConfig) -> int:
    """Bytes of weights one decode step reads: everything once (wte twice counts once: the
    LM head streams all of it, the embedding lookup one row), wpe only one row."""
    wpe = host["wpe.weight"]
    return sum(v.nbytes for v in host.values()) - wpe.nbytes + wpe.nbytes // cfg.n_ctx


def torch_generate(hf, prompt: np.ndarray, new_tokens: int):
    """transformers' greedy generate with its KV cache; never stops early at <|endoftext|>."""
    import torch

    ids = torch.from_numpy(prompt[None, :])

    def run():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)  # fmt: skip

    return run


def npgpt_generate(model, prompt: np.ndarray, new_tokens: int, use_cache: bool = True, stats=None):
    return lambda: list(generate_ids(model, prompt.tolist(), new_tokens, GREEDY, use_cache=use_cache, stats=stats))


def tokens_report(seconds: list[float], new_tokens: int, ceiling_tokens_per_s: float) -> dict:
    s = summary(seconds)
    rate = new_tokens / s["median_s"]
    return {**s, "tokens_per_s": rate, "fraction_of_bandwidth_ceiling": rate / ceiling_tokens_per_s}


def agreement(npgpt_ids: list[int], torch_ids: list[int]) -> int:
    """How many leading greedy tokens npgpt and transformers agree on (a correctness check:
    with random weights near-ties can make float32 paths part after a while)."""
    n = 0
    for a, b in zip(npgpt_ids, torch_ids):
        if a != b:
            break
        n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vs", choices=["torch"], help="also run transformers' generate on the same weights")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of cached generation (and transformers)")
    ap.add_argument("--recompute-repeats", type=int, default=1, help="timed runs of the slow no-cache path (0: skip)")
    ap.add_argument("--ttft-tokens", type=int, default=1024, help="prompt length for time to first token (0: skip)")
    ap.add_argument("--preset", default="gpt2")
    args = ap.parse_args(argv)

    load_before = load_average()
    cfg = GPTConfig.preset(args.preset)
    host = init_params(cfg, seed=0)
    model = GPT.from_numpy(cfg, host)
    bytes_per_token = weight_bytes_per_token(host, cfg)
    hf = None
    if args.vs == "torch":
        import torch  # noqa: F401  (imported before `threads` so it limits torch too)

        from bench_forward import torch_model

        hf = torch_model(cfg, host)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_tokens)
    long_prompt = rng.integers(0, cfg.vocab_size, args.ttft_tokens)

    results = []
    for n_threads in args.threads:
        with threads(n_threads):
            log(f"generate threads={n_threads}: bandwidth ...")
            bandwidth = memory_bandwidth()
            ceiling = bandwidth / bytes_per_token  # tokens/s if every weight byte streamed at `bandwidth`
            row = {"threads": n_threads, "bandwidth_gb_s": bandwidth / 1e9, "ceiling_tokens_per_s": ceiling}

            stats = GenerationStats()
            contenders = {"cached": npgpt_generate(model, prompt, args.new_tokens, stats=stats)}
            if hf is not None:
                contenders["torch"] = torch_generate(hf, prompt, args.new_tokens)
            log(f"generate threads={n_threads}: cached{' vs torch' if hf else ''} x{args.repeats} ...")
            times = interleaved(contenders, args.repeats)
            for name, seconds in times.items():
                row[name] = tokens_report(seconds, args.new_tokens, ceiling)
            row["cached"]["decode_only_tokens_per_s"] = stats.new_tokens / stats.generate_seconds
            if args.recompute_repeats:
                log(f"generate threads={n_threads}: recompute x{args.recompute_repeats} ...")
                seconds = interleaved({"recompute": npgpt_generate(model, prompt, args.new_tokens, use_cache=False)},
                                      args.recompute_repeats, warmup=0)["recompute"]  # fmt: skip
                row["recompute"] = tokens_report(seconds, args.new_tokens, ceiling)
                row["speedup_cached_over_recompute"] = row["cached"]["tokens_per_s"] / row["recompute"]["tokens_per_s"]
            if hf is not None:
                row["speedup_cached_over_torch"] = row["cached"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
                ours = npgpt_generate(model, prompt, args.new_tokens)()
                theirs = contenders["torch"]()[0, args.prompt_tokens :].tolist()
                row["greedy_tokens_agreeing_with_torch"] = agreement(ours, theirs)
            if args.ttft_tokens:
                log(f"generate threads={n_threads}: time to first token, {args.ttft_tokens}-token prompt ...")
                first = {"npgpt": npgpt_generate(model, long_prompt, 1)}
                if hf is not None:
                    first["torch"] = torch_generate(hf, long_prompt, 1)
                ttft = {name: summary(s) for name, s in interleaved(first, args.repeats).items()}
                if hf is not None:
                    ttft["ratio_npgpt_over_torch"] = ttft["npgpt"]["median_s"] / ttft["torch"]["median_s"]
                row["time_to_first_token"] = {"prompt_tokens": args.ttft_tokens, **ttft}
            results.append(row)
            log(row)
    emit({
        "benchmark": "generate", "model": args.preset, "dtype": "float32", "batch": 1, "sampling": "greedy",
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "weight_bytes_read_per_token": bytes_per_token, "loadavg_before": load_before,
        "peak_rss_bytes": peak_rss_bytes(), "results": results,
    })  # fmt: skip
    return 0

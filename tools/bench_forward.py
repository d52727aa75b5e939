"""Forward-pass benchmark: GPT-2 124M shape, random weights, float32.

For each shape (B=1,T=1024 and B=8,T=128) and thread count (1, 2) it reports tokens/s,
the fraction of this machine's float32 matmul ceiling reached (measured in the same run
on the model's own GEMM shapes), and with --vs torch the same forward through
transformers' GPT2LMHeadModel on the same weights, interleaved, and the time ratio.

FLOPs are counted as 2 * N_non-embedding * tokens + attention (QK^T and AV over the full
T x T square, 4 T^2 C per layer and sequence, although the causal half is masked) + the
LM head (2 C V per token).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np

from benchlib import emit, interleaved, log, matmul_rate, summary, threads
from npgpt.config import GPTConfig
from npgpt.model import GPT, init_params

SHAPES = ((1, 1024), (8, 128))


def forward_flops(cfg: GPTConfig, B: int, T: int) -> float:
    C, L = cfg.n_embd, cfg.n_layer
    linear = 2 * 12 * C * C * L * B * T
    attention = 4 * T * T * C * L * B
    head = 2 * C * cfg.vocab_size * B * T
    return float(linear + attention + head)


def gemm_shapes(cfg: GPTConfig, B: int, T: int):
    """The forward's GEMMs as ((M, K, N), count): 4 per layer and the LM head."""
    N, C = B * T, cfg.n_embd
    per_layer = [(N, C, 3 * C), (N, C, C), (N, C, 4 * C), (N, 4 * C, C)]
    return [(s, cfg.n_layer) for s in per_layer] + [((N, C, cfg.vocab_size), 1)]


def ceiling(cfg, B, T) -> float:
    """FLOP/s of the forward's own GEMMs on this machine, weighted by how often each runs."""
    flops = seconds = 0.0
    for (m, k, n), count in gemm_shapes(cfg, B, T):
        rate = matmul_rate([(m, k, n)])
        flops += count * 2.0 * m * k * n
        seconds += count * 2.0 * m * k * n / rate
    return flops / seconds


def torch_model(cfg: GPTConfig, params: dict):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, attn_pdrop=0.0, embd_pdrop=0.0,
                                    resid_pdrop=0.0))  # fmt: skip
    state = {f"transformer.{k}": torch.from_numpy(np.array(v)) for k, v in params.items()}
    hf.load_state_dict(state, strict=False)
    return hf.eval()


def npgpt_peak_rss(B: int, T: int, n_threads: int) -> int:
    """Peak RSS of npgpt alone: a fresh process that builds the model and runs one forward."""
    code = (
        "import sys; sys.path.insert(0, 'tools'); import numpy as np; import benchlib as b; "
        "from npgpt.config import GPTConfig; from npgpt.model import GPT; "
        f"m = GPT.init(GPTConfig.preset('gpt2'))\nwith b.threads({n_threads}): "
        f"m.forward(np.zeros(({B}, {T}), dtype=np.int64))\nprint(b.peak_rss_bytes())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vs", choices=["torch"], help="also run the same forward through PyTorch/transformers")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="gpt2")
    args = ap.parse_args(argv)

    cfg = GPTConfig.preset(args.preset)
    host = init_params(cfg, seed=0)
    model = GPT.from_numpy(cfg, host)
    weights_bytes = sum(v.nbytes for v in host.values())
    peer = None
    if args.vs == "torch":
        import torch

        peer = torch_model(cfg, host)
    rng = np.random.default_rng(0)
    results = []
    for n_threads in args.threads:
        with threads(n_threads):
            for B, T in SHAPES:
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
                rate = ceiling(cfg, B, T)
                flops = forward_flops(cfg, B, T)
                row = {"B": B, "T": T, "threads": n_threads, "matmul_ceiling_gflops": rate / 1e9}
                for name, ts in times.items():
                    s = summary(ts)
                    row[name] = {**s, "tokens_per_s": B * T / s["median_s"],
                                 "fraction_of_ceiling": flops / s["median_s"] / rate}  # fmt: skip
                if peer is not None:
                    row["ratio_npgpt_over_torch"] = row["npgpt"]["median_s"] / row["torch"]["median_s"]
                activations = 4 * B * T * cfg.vocab_size  # the float32 logits dominate
                row["npgpt"]["peak_rss_bytes"] = rss = npgpt_peak_rss(B, T, n_threads)
                row["npgpt"]["peak_rss_over_weights_plus_logits"] = rss / (weights_bytes + activations)
                results.append(row)
                log(row)
    emit({
        "benchmark": "forward", "model": args.preset, "dtype": "float32",
        "flops_per_forward": {f"B{B}_T{T}": forward_flops(cfg, B, T) for B, T in SHAPES},
        "weights_bytes": weights_bytes, "results": results,
    })  # fmt: skip
    return 0

"""GPU benchmark: GPT-2 124M (random weights, float32) on npgpt's CuPy backend, and the
same model in PyTorch CUDA (--vs torch, when torch sees a GPU), in one process.

  generate  greedy decoding, B=1, a --prompt-tokens prompt then --new-tokens tokens with
            the KV cache: npgpt's generate_ids vs transformers' generate; tokens/s over the
            whole call (prefill included). Decoding streams every weight once per token,
            so the ceiling is device memory bandwidth, measured here (summing 1 GiB).
  train     one training step at --batch x --seq (loss_and_grads, clip to 1.0, AdamW) vs
            the same step in PyTorch; seconds and tokens/s, and model FLOP/s as
            6 * parameters * tokens / time (attention's FLOPs not counted).

Contenders are timed round-robin, each call ending with a device synchronisation; the
report also gives peak device memory, how many greedy tokens agree, and the first step's
loss in both. JSON on stdout:  python tools/bench_gpu.py --vs torch > gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from benchlib import emit, interleaved, log, summary
from npgpt.backend import get_backend
from npgpt.config import GPTConfig
from npgpt.generate import generate_ids
from npgpt.model import GPT, init_params
from npgpt.optim import AdamW, clip_grad_norm, default_decay
from npgpt.sampling import SamplingConfig

GREEDY = SamplingConfig(greedy=True)
TORCH_DEVICE = "cuda"


# -- npgpt on the device -------------------------------------------------------------------
def npgpt_generate(model, prompt: np.ndarray, new_tokens: int):
    def run():
        ids = list(generate_ids(model, prompt.tolist(), new_tokens, GREEDY))
        model.backend.synchronize()
        return ids

    return run


class NpgptStep:
    """loss_and_grads, clip_grad_norm, AdamW: the loss stays on the device (no read-back)."""

    def __init__(self, cfg, host, backend):
        self.model = GPT.from_numpy(cfg, host, backend)
        self.opt = AdamW(self.model.params, self.model.backend)

    def __call__(self, ids, targets):
        loss, grads = self.model.loss_and_grads(ids, targets)
        clip_grad_norm(grads, 1.0, self.model.backend)
        self.opt.step(grads, lr=1e-4)
        self.model.backend.synchronize()
        return loss


def device_bandwidth(backend, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Read bandwidth of the device in bytes/s: best time to sum a float32 array."""
    xp = backend.xp
    x = xp.ones((nbytes // 4,), dtype=xp.float32, device=backend.device)

    def once():
        start = time.perf_counter()
        xp.sum(x)
        backend.synchronize()
        return time.perf_counter() - start

    once()
    return nbytes / min(once() for _ in range(repeats))


# -- PyTorch CUDA --------------------------------------------------------------------------
def torch_cuda():
    """The torch module if it can use a GPU, else (None, why not)."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no GPU (a CPU-only build?)"
    return torch, None


def torch_model(torch, cfg: GPTConfig, host: dict[str, np.ndarray], train: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))  # fmt: skip
    hf.load_state_dict({f"transformer.{k}": torch.from_numpy(v.copy()) for k, v in host.items()}, strict=False)
    return hf.to(TORCH_DEVICE).train(train)


def torch_generate(torch, hf, prompt: np.ndarray, new_tokens: int):
    ids = torch.from_numpy(prompt[None, :]).to(TORCH_DEVICE)

    def run():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)  # fmt: skip
        torch.cuda.synchronize()
        return out[0, ids.shape[1] :].tolist()

    return run


class TorchStep:
    """The same step: GPT2LMHeadModel, cross-entropy, clip_grad_norm_, AdamW (same decay)."""

    def __init__(self, torch, cfg, host):
        self.torch, self.model = torch, torch_model(torch, cfg, host, train=True)
        named = {n.removeprefix("transformer."): p for n, p in self.model.named_parameters()}
        groups = [{"params": [p for n, p in named.items() if default_decay(n, tuple(p.shape))], "weight_decay": 0.1},
                  {"params": [p for n, p in named.items() if not default_decay(n, tuple(p.shape))], "weight_decay": 0.0}]  # fmt: skip
        self.opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    def __call__(self, ids, targets):
        torch = self.torch
        x, y = torch.from_numpy(ids).to(TORCH_DEVICE), torch.from_numpy(targets).to(TORCH_DEVICE)
        logits = self.model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        torch.cuda.synchronize()
        return loss


# -- the report ----------------------------------------------------------------------------
def agreement(a: list[int], b: list[int]) -> int:
    """Leading greedy tokens two runs agree on (near-ties may part float32 paths later)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def bench_generate(args, cfg, host, backend, torch) -> dict:
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, args.prompt_tokens)
    model = GPT.from_numpy(cfg, host, backend)
    contenders = {"npgpt": npgpt_generate(model, prompt, args.new_tokens)}
    if torch is not None:
        contenders["torch"] = torch_generate(torch, torch_model(torch, cfg, host, train=False), prompt, args.new_tokens)
    log(f"generate: {' vs '.join(contenders)} x{args.repeats} ...")
    times = interleaved(contenders, args.repeats)
    weight_bytes = sum(v.nbytes for v in host.values())
    ceiling = device_bandwidth(backend) / weight_bytes  # tokens/s if only weight reads counted
    report = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "ceiling_tokens_per_s": ceiling}
    for name, seconds in times.items():
        rate = args.new_tokens / summary(seconds)["median_s"]
        report[name] = {**summary(seconds), "tokens_per_s": rate, "fraction_of_bandwidth_ceiling": rate / ceiling}
    if torch is not None:
        report["greedy_tokens_agreeing"] = agreement(contenders["npgpt"](), contenders["torch"]())
        report["torch_over_npgpt_speed"] = report["torch"]["tokens_per_s"] / report["npgpt"]["tokens_per_s"]
    report["npgpt_peak_device_bytes"] = backend.peak_memory_bytes()
    return report


def bench_train(args, cfg, host, backend, torch) -> dict:
    rng = np.random.default_rng(2)
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.seq))
    targets = rng.integers(0, cfg.vocab_size, (args.batch, args.seq))
    contenders = {"npgpt": NpgptStep(cfg, host, backend)}
    if torch is not None:
        contenders["torch"] = TorchStep(torch, cfg, host)
    first_loss = {}
    for name, step in contenders.items():  # also the warm-up step
        loss = step(ids, targets)
        first_loss[name] = float(backend.to_numpy(loss)) if name == "npgpt" else loss.item()
    log(f"train B={args.batch} T={args.seq}: {' vs '.join(contenders)} x{args.repeats} ...")
    times = interleaved({name: (lambda s=step: s(ids, targets)) for name, step in contenders.items()}, args.repeats, warmup=0)
    tokens, n_params = args.batch * args.seq, sum(v.size for v in host.values())
    report = {"batch": args.batch, "seq": args.seq, "first_step_loss": first_loss}
    for name, seconds in times.items():
        s = summary(seconds)
        report[name] = {**s, "tokens_per_s": tokens / s["median_s"], "model_flops_per_s": 6 * n_params * tokens / s["median_s"]}
    if torch is not None:
        report["torch_over_npgpt_speed"] = report["npgpt"]["median_s"] / report["torch"]["median_s"]
        report["torch_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        report["torch_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    report["npgpt_peak_device_bytes"] = backend.peak_memory_bytes()
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cupy", help="npgpt backend to run (default: cupy)")
    ap.add_argument("--vs", choices=["torch"], help="also run PyTorch CUDA on the same weights")
    ap.add_argument("--preset", default="gpt2", help="model shape (default: gpt2, the 124M)")
    ap.add_argument("--only", choices=["generate", "train"], help="run one of the two benchmarks")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-layer", type=int, help="fewer blocks than the preset (a quick smoke run)")
    args = ap.parse_args(argv)

    backend = get_backend(args.backend)
    torch, why_not = torch_cuda() if args.vs == "torch" else (None, "not requested (--vs torch)")
    cfg = GPTConfig.preset(args.preset)
    cfg = dataclasses.replace(cfg, n_layer=args.n_layer) if args.n_layer else cfg
    host = init_params(cfg, seed=0)
    report = {"backend": backend.name, "preset": args.preset, "dtype": "float32", "device": device_name(backend),
              "torch": torch.__version__ if torch else f"skipped: {why_not}"}  # fmt: skip
    if args.only in (None, "generate"):
        report["generate"] = bench_generate(args, cfg, host, backend, torch)
    if args.only in (None, "train"):
        report["train"] = bench_train(args, cfg, host, backend, torch)
    emit(report)
    return 0


def device_name(backend) -> str:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(backend.device.id)["name"].decode()
    except Exception:
        return str(backend.device)


if __name__ == "__main__":
    raise SystemExit(main())

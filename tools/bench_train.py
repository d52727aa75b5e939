"""Training benchmark: `python tools/bench.py train [--vs torch] [--configs a b c] [--recipe shakespeare-char]`.

Step time, float32, random init (GPT-2's), random token batches:
    a  n_layer 6, n_head 6, n_embd 384, T 256, B 8, vocab 65      forward + backward + clip + AdamW
    b  the same with vocab 50257                                   forward + backward + clip + AdamW
    c  GPT-2 124M, B 1, T 1024                                      forward + backward
each against the identical PyTorch model (transformers' GPT2LMHeadModel with npgpt's
weights, F.cross_entropy, clip_grad_norm_, torch.optim.AdamW) on the same batch,
interleaved in one process at the same thread count. Reported: median step time, the
ratio npgpt / torch, tokens/s, and the fraction of this machine's matmul ceiling
(FLOPs = 3 x the forward's, counted as in bench_forward; the ceiling is the GEMM rate
measured in the same run on the step's own forward and backward GEMM shapes). Peak RSS
is measured for each side alone in a fresh subprocess (one warm-up step + one step).

--recipe shakespeare-char: the CPU character-level recipe (4 layers, 4 heads, 128
embd, context 64, batch 12, 2000 iterations, lr 1e-3 with 100 warm-up steps and cosine
to 1e-4, AdamW betas (0.9, 0.99), weight decay 0.1, clip 1.0, no dropout) on a 90/10
split of tinyshakespeare, through npgpt and through an equivalent PyTorch loop from the
same initial weights and the same batches. The two loops alternate in chunks of 10
steps so machine load hits both alike; reported: training wall time of each and the
final validation loss over 200 fixed validation batches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent)]

from benchlib import emit, interleaved, log, matmul_rate, peak_rss_bytes, summary, threads  # noqa: E402
from bench_forward import forward_flops, gemm_shapes  # noqa: E402
from npgpt.config import GPTConfig  # noqa: E402
from npgpt.model import GPT, init_params  # noqa: E402
from npgpt.optim import AdamW, clip_grad_norm, cosine_lr, default_decay  # noqa: E402

CONFIGS = {
    "a": dict(cfg=dict(n_layer=6, n_head=6, n_embd=384, vocab_size=65, n_ctx=256), B=8, T=256, optimizer=True),
    "b": dict(cfg=dict(n_layer=6, n_head=6, n_embd=384, vocab_size=50257, n_ctx=256), B=8, T=256, optimizer=True),
    "c": dict(cfg=dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_ctx=1024), B=1, T=1024, optimizer=False),
}
SHAKESPEARE = TOOLS.parent.parent / "shared" / "data" / "corpora" / "tinyshakespeare.txt"


# -- the two contenders ------------------------------------------------------------------
class NpgptStep:
    """One training step of npgpt: loss_and_grads, clip, AdamW (or forward + backward only)."""

    def __init__(self, cfg, host, optimizer=True, betas=(0.9, 0.95)):
        self.model = GPT.from_numpy(cfg, {k: v.copy() for k, v in host.items()})
        self.opt = AdamW(self.model.params, self.model.backend, betas=betas) if optimizer else None

    def __call__(self, ids, targets, lr=1e-4):
        loss, grads = self.model.loss_and_grads(ids, targets)
        if self.opt is not None:
            clip_grad_norm(grads, 1.0, self.model.backend)
            self.opt.step(grads, lr)
        return float(loss)

    def val_loss(self, batches):
        return float(np.mean([float(self.model.loss(x, y)) for x, y in batches]))


class TorchStep:
    """The same step in PyTorch: GPT2LMHeadModel (npgpt's weights), F.cross_entropy,
    clip_grad_norm_, torch.optim.AdamW with the same decay groups."""

    def __init__(self, cfg, host, optimizer=True, betas=(0.9, 0.95)):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        self.torch = torch
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
                                                n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                                attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))  # fmt: skip
        self.model.load_state_dict({f"transformer.{k}": torch.from_numpy(v.copy()) for k, v in host.items()}, strict=False)
        self.model.train()
        self.opt = None
        if optimizer:
            named = {n.removeprefix("transformer."): p for n, p in self.model.named_parameters()}
            groups = [{"params": [p for n, p in named.items() if default_decay(n, tuple(p.shape))], "weight_decay": 0.1},
                      {"params": [p for n, p in named.items() if not default_decay(n, tuple(p.shape))], "weight_decay": 0.0}]  # fmt: skip
            self.opt = torch.optim.AdamW(groups, lr=1e-4, betas=betas, eps=1e-8)

    def __call__(self, ids, targets, lr=1e-4):
        torch = self.torch
        logits = self.model(torch.from_numpy(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1))
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        if self.opt is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
        return loss.item()

    def val_loss(self, batches):
        torch = self.torch
        with torch.no_grad():
            losses = []
            for x, y in batches:
                logits = self.model(torch.from_numpy(x)).logits
                losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1)).item())
        return float(np.mean(losses))


CONTENDERS = {"npgpt": NpgptStep, "torch": TorchStep}


# -- step benchmark ------------------------------------------------------------------------
def train_ceiling(cfg: GPTConfig, B: int, T: int) -> float:
    """FLOP/s of the step's GEMMs: each forward (M, K, N) and its two backward GEMMs,
    dX (M, N, K) and dW (K, M, N), weighted by FLOPs."""
    flops = seconds = 0.0
    for (m, k, n), count in gemm_shapes(cfg, B, T):
        for shape in ((m, k, n), (m, n, k), (k, m, n)):
            work = count * 2.0 * m * k * n
            flops += work
            seconds += work / matmul_rate([shape], repeats=3)
    return flops / seconds


def batch(cfg, B, T, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


def peak_rss(name: str, config: str, n_threads: int) -> int:
    """Peak RSS of one contender alone: a fresh process that builds it and runs 2 steps."""
    out = subprocess.run([sys.executable, __file__, "--peak-rss-of", name, "--configs", config, "--threads", str(n_threads)],
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"peak-RSS subprocess for {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)["peak_rss_bytes"]


def measure_peak(name: str, config: str, n_threads: int) -> int:
    spec = CONFIGS[config]
    cfg = GPTConfig(**spec["cfg"])
    if name == "torch":
        import torch  # noqa: F401  (imported before the thread limit so it is applied)
    with threads(n_threads):
        step = CONTENDERS[name](cfg, init_params(cfg, seed=0), spec["optimizer"])
        ids, targets = batch(cfg, spec["B"], spec["T"])
        step(ids, targets)
        step(ids, targets)
    return peak_rss_bytes()


def bench_steps(args) -> list[dict]:
    names = ["npgpt", "torch"] if args.vs == "torch" else ["npgpt"]
    if "torch" in names:
        import torch  # noqa: F401
    rows = []
    for config in args.configs:
        spec = CONFIGS[config]
        cfg, B, T = GPTConfig(**spec["cfg"]), spec["B"], spec["T"]
        host = init_params(cfg, seed=0)
        ids, targets = batch(cfg, B, T)
        flops = 3 * forward_flops(cfg, B, T)
        for n_threads in args.threads:
            with threads(n_threads):
                steps = {name: CONTENDERS[name](cfg, host, spec["optimizer"]) for name in names}
                log(f"train step {config} threads={n_threads} ...")
                times = interleaved({name: (lambda s=s: s(ids, targets)) for name, s in steps.items()}, args.repeats)
                del steps
                rate = train_ceiling(cfg, B, T)
            row = {"config": config, "what": "fwd+bwd+clip+AdamW" if spec["optimizer"] else "fwd+bwd",
                   "B": B, "T": T, **spec["cfg"], "threads": n_threads, "matmul_ceiling_gflops": rate / 1e9}  # fmt: skip
            for name, ts in times.items():
                s = summary(ts)
                row[name] = {**s, "tokens_per_s": B * T / s["median_s"], "fraction_of_ceiling": flops / s["median_s"] / rate}
                if args.memory:
                    row[name]["peak_rss_bytes"] = peak_rss(name, config, n_threads)
            if "torch" in times:
                row["ratio_npgpt_over_torch"] = row["npgpt"]["median_s"] / row["torch"]["median_s"]
            log(row)
            rows.append(row)
    return rows


# -- the recipe race -------------------------------------------------------------------------
RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block=64, batch=12, iters=2000, lr=1e-3, min_lr=1e-4, warmup=100,
              betas=(0.9, 0.99), val_batches=200, chunk=10)  # fmt: skip


def recipe_race(args) -> dict:
    from npgpt.data import BatchSampler, split_tokens
    from npgpt.tokenizer import CharTokenizer

    r = RECIPE
    text = Path(args.corpus).read_text("utf-8")
    tok = CharTokenizer.train(text)
    train, val = split_tokens(np.asarray(tok.encode(text)), 0.1)
    cfg = GPTConfig(vocab_size=tok.n_vocab, n_ctx=r["block"], n_embd=r["n_embd"], n_head=r["n_head"], n_layer=r["n_layer"])
    host = init_params(cfg, seed=1337)
    train_data = BatchSampler(train, r["batch"], r["block"], seed=1337)
    val_batches = [BatchSampler(val, r["batch"], r["block"], seed=1337, split="val").batch(i) for i in range(r["val_batches"])]
    names = ["npgpt", "torch"] if args.vs == "torch" else ["npgpt"]
    if "torch" in names:
        import torch  # noqa: F401
    result = {"recipe": "shakespeare-char", **{k: v for k, v in r.items() if k != "betas"}, "vocab": tok.n_vocab,
              "threads": args.threads[0], "train_tokens": len(train), "val_tokens": len(val)}  # fmt: skip
    with threads(args.threads[0]):
        steps = {name: CONTENDERS[name](cfg, host, True, r["betas"]) for name in names}
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
    ap.add_argument("--vs", choices=["torch"], help="also run the identical PyTorch model, interleaved")
    ap.add_argument("--configs", nargs="*", default=["a", "b", "c"], choices=sorted(CONFIGS), help="step-time configs (default a b c)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-contender peak-RSS subprocesses")
    ap.add_argument("--recipe", choices=["shakespeare-char"], help="run the recipe race instead of the step benchmark")
    ap.add_argument("--corpus", default=str(SHAKESPEARE), help="tinyshakespeare.txt for the recipe")
    ap.add_argument("--peak-rss-of", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_rss_of:
        print(json.dumps({"peak_rss_bytes": measure_peak(args.peak_rss_of, args.configs[0], args.threads[0])}))
        return 0
    if args.recipe:
        emit({"benchmark": "train-recipe", **recipe_race(args)})
    else:
        emit({"benchmark": "train-step", "dtype": "float32", "results": bench_steps(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

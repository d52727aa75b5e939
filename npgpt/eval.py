"""Perplexity of a checkpoint on a text file: `python -m npgpt.eval --weights DIR --data FILE`.

Texts longer than the context are scored with a sliding window, the method Hugging Face
documents for GPT-2 ("Perplexity of fixed-length models"): windows of up to `context`
tokens start every `stride` tokens, and each window scores only the tokens no earlier
window scored (the others get the ignore index), so every token after the first is
predicted exactly once, with up to `context - stride` tokens of extra history.
stride == context means disjoint windows (fastest, least context per token).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from npgpt.layers import IGNORE_INDEX


def sliding_windows(n_tokens: int, context: int, stride: int):
    """(begin, end, first_scored) per window: inputs are tokens [begin, end - 1), targets
    [begin + 1, end), and only targets at positions >= first_scored count."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    scored_to = 1  # token 0 has no history: it is never predicted
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + context + 1, n_tokens)
        yield begin, end, scored_to
        scored_to = end
        if end == n_tokens:
            return


def perplexity(model, ids: np.ndarray, context: int | None = None, stride: int | None = None) -> dict:
    """Mean negative log-likelihood (nats/token) and perplexity of `ids` under `model`."""
    context = context or model.config.n_ctx
    if context > model.config.n_ctx:
        raise ValueError(f"context {context} exceeds the model's n_ctx {model.config.n_ctx}")
    stride = stride or max(1, context // 2)
    nll, count, windows = 0.0, 0, 0
    for begin, end, first in sliding_windows(len(ids), context, stride):
        inputs = ids[begin : end - 1]
        targets = ids[begin + 1 : end].astype(np.int64)  # a copy: the ignored part is overwritten
        targets[: first - (begin + 1)] = IGNORE_INDEX
        n_new = end - first
        loss = model.loss(inputs[None, :], targets[None, :], ignore_index=IGNORE_INDEX)  # mean over the new tokens
        nll += float(model.backend.to_numpy(loss)) * n_new
        count += n_new
        windows += 1
    if count == 0:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    mean = nll / count
    return {"tokens_evaluated": count, "windows": windows, "context": context, "stride": stride,
            "loss": mean, "perplexity": math.exp(mean)}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m npgpt.eval", description=__doc__.split("\n\n")[0].split(": ")[0] + ".",
                                epilog="See the module docstring (python -c 'import npgpt.eval; help(npgpt.eval)') for the method.")  # fmt: skip
    p.add_argument("--weights", required=True, help="checkpoint folder (model.safetensors + tokenizer), .safetensors file, or NAME for weights/NAME/")
    p.add_argument("--data", required=True, help="UTF-8 text file to score")
    p.add_argument("--context", type=int, help="tokens per window (default: the model's n_ctx)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: context // 2)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--backend", default="numpy", help="array backend (default numpy)")
    p.add_argument("--dtype", choices=["float16", "float32", "float64"], help="cast the weights (default: as stored)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv=None) -> int:
    from npgpt.backend import BackendError, get_backend
    from npgpt.generate import WeightsError, load_model

    args = build_parser().parse_args(argv)
    try:
        model, tokenizer = load_model(args.weights, get_backend(args.backend), args.dtype)
        with open(args.data, encoding="utf-8") as f:
            ids = np.asarray(tokenizer.encode(f.read(), allowed_special="all"), dtype=np.int64)
        if args.max_tokens:
            ids = ids[: args.max_tokens]
        start = time.perf_counter()
        result = perplexity(model, ids, args.context, args.stride)
    except (WeightsError, BackendError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.data}: {result['tokens_evaluated']:,} tokens evaluated in {result['windows']} windows "
              f"(context {result['context']}, stride {result['stride']}): loss {result['loss']:.4f} nats/token, "
              f"perplexity {result['perplexity']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

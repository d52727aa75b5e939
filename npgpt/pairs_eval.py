"""A model scored on prompt/completion pairs (`python -m npgpt.eval --format pairs`).

Two numbers per file:
- the loss (mean negative log-likelihood per token, nats) and perplexity of the completions
  given their prompts, with the completion + end-of-text targets of `npgpt.pairs` (a
  tokenizer without <|endoftext|> scores the completion tokens alone);
- exact match: the share of prompts whose greedy continuation, up to <|endoftext|> or the
  first stop string, is exactly the completion (cut before its own first stop string, so a
  completion that ends in the stop string is still matched).

Generation for a prompt ends as soon as its text can no longer match the completion.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from npgpt.layers import IGNORE_INDEX
from npgpt.pairs import SKIP_HINT, PairsError, PairsFile, encode_pair, make_example
from npgpt.sampling import SamplingConfig

PROGRESS_SECONDS = 5.0  # between progress lines


def cut_at_stop(text: str, stops) -> str:
    """`text` before the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def greedy_matches(model, tokenizer, prompt: list[int], expected: str, stops=(), max_new_tokens: int = 256) -> bool:
    """Does greedy decoding after `prompt` produce exactly `expected`, then stop?"""
    from npgpt.generate import generate

    prompt = prompt[-model.config.n_ctx :]
    text = ""
    pieces = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                      sampling=SamplingConfig(greedy=True), stop=stops)  # fmt: skip
    for piece in pieces:
        text += piece
        if not expected.startswith(text):
            return False  # it can no longer match: stop generating
    return text == expected


def score_pairs(model, tokenizer, file: PairsFile, stops=(), max_new_tokens: int = 256, skip_bad: bool = False,
                progress=None) -> dict:  # fmt: skip
    """Completion loss, perplexity and exact-match accuracy of `model` on `file`'s pairs.
    `progress(line)` receives a progress line every few seconds and at the end."""
    n_ctx, eot = model.config.n_ctx, tokenizer.eot_id
    nll, scored, correct, truncated, done = 0.0, 0, 0, 0, 0
    start = last = time.perf_counter()
    total = len(file.pairs)
    for pair in file.pairs:
        try:
            prompt, completion = encode_pair(tokenizer, pair)
            example = make_example(prompt, completion, eot, n_ctx)
        except ValueError as e:
            where = f"{file.path}:{pair.line}: {e}"
            if not skip_bad:
                raise PairsError(f"{where}; {SKIP_HINT}") from None
            file.skipped.append(where)
            total -= 1
            continue
        n = int(np.count_nonzero(example.targets != IGNORE_INDEX))
        loss = model.loss(example.ids[None, :], example.targets[None, :])
        nll += float(model.backend.to_numpy(loss)) * n
        scored += n
        truncated += example.cut > 0
        correct += greedy_matches(model, tokenizer, prompt, cut_at_stop(pair.completion, stops), stops, max_new_tokens)
        done += 1
        now = time.perf_counter()
        if progress and (now - last >= PROGRESS_SECONDS or done == total):
            progress(progress_line(done, total, correct, now - start))
            last = now
    if not done:
        raise PairsError(f"{file.path}: no record could be scored{file.skip_note()}")
    loss = nll / scored
    return {"data": file.path, "pairs": done, "skipped": len(file.skipped), "truncated": truncated,
            "completion_tokens": scored, "loss": loss, "perplexity": math.exp(min(loss, 700)),
            "exact_match": correct / done, "correct": correct, "stop": list(stops),
            "end_of_text": eot is not None, "seconds": time.perf_counter() - start}  # fmt: skip


def progress_line(done: int, total: int, correct: int, elapsed: float) -> str:
    from npgpt.train import format_duration

    rate = done / elapsed if elapsed > 0 else float("inf")
    eta = (total - done) / rate if rate > 0 else 0.0
    return (f"pairs {done}/{total} | exact match {100 * correct / done:.1f}% | {rate:.1f} pairs/s | "
            f"ETA {format_duration(eta)}")  # fmt: skip


def summary(result: dict) -> str:
    """The human-readable result line."""
    notes = [f"{result['truncated']} prompts truncated", f"{result['skipped']} skipped"]
    if not result["end_of_text"]:
        notes.append("no <|endoftext|> in this vocabulary: completions scored without it")
    stop = f", stop {result['stop']!r}" if result["stop"] else ""
    return (f"{result['data']}: {result['pairs']:,} pairs ({'; '.join(notes)}): completion loss "
            f"{result['loss']:.4f} nats/token, perplexity {result['perplexity']:.3f} over "
            f"{result['completion_tokens']:,} tokens; exact match {100 * result['exact_match']:.1f}% "
            f"({result['correct']}/{result['pairs']}, greedy{stop}) in {result['seconds']:.1f} s")  # fmt: skip


def say(line: str):
    print(line, file=sys.stderr, flush=True)

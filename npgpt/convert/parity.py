"""Compare two implementations of the same GPT-2 on fixed prompts: the converter's --check.

Each model is a function `logits_fn(ids: list[int]) -> (T, V) array`, so this module needs
neither torch nor transformers; tools/convert_gpt2.py wraps transformers' model in one.
Per prompt it reports the largest |logit difference|, how often the top-1 tokens agree,
the perplexity of the prompt under each model, and whether greedy continuations match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

LogitsFn = Callable[[list[int]], np.ndarray]

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers that",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "The capital of France is Paris. The capital of Germany is",
)


@dataclass
class PromptReport:
    ids: list[int]
    max_abs_logit_diff: float
    top1_agreement: float  # fraction of positions whose argmax tokens agree
    perplexity_reference: float
    perplexity_candidate: float
    greedy_reference: list[int]
    greedy_candidate: list[int]

    @property
    def greedy_identical(self) -> bool:
        return self.greedy_reference == self.greedy_candidate


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(T, V) -> (T, V) in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, ids: Sequence[int]) -> float:
    """exp(mean negative log-likelihood of ids[1:] given the logits at the previous positions)."""
    if len(ids) < 2:
        raise ValueError("perplexity needs a prompt of at least 2 tokens")
    logp = log_softmax(logits[:-1])  # (T-1, V)
    return float(np.exp(-logp[np.arange(len(ids) - 1), np.asarray(ids[1:])].mean()))


def greedy(logits_fn: LogitsFn, ids: Sequence[int], n_new: int) -> list[int]:
    """n_new argmax tokens after `ids`, recomputing the whole sequence each step."""
    ids = list(ids)
    new = []
    for _ in range(n_new):
        new.append(int(np.argmax(logits_fn(ids + new)[-1])))
    return new


def compare(reference: LogitsFn, candidate: LogitsFn, prompts: Sequence[Sequence[int]], n_new: int = 32) -> list[PromptReport]:
    reports = []
    for ids in prompts:
        ids = list(ids)
        ref, cand = np.asarray(reference(ids)), np.asarray(candidate(ids))  # (T, V) each
        reports.append(
            PromptReport(
                ids=ids,
                max_abs_logit_diff=float(np.abs(ref.astype(np.float64) - cand).max()),
                top1_agreement=float((ref.argmax(-1) == cand.argmax(-1)).mean()),
                perplexity_reference=perplexity(ref, ids),
                perplexity_candidate=perplexity(cand, ids),
                greedy_reference=greedy(reference, ids, n_new),
                greedy_candidate=greedy(candidate, ids, n_new),
            )
        )
    return reports


def format_report(reports: Sequence[PromptReport], names=("transformers", "npgpt"), decode=None) -> str:
    """A plain-text table, one row per prompt, then the verdict lines."""
    ref, cand = names
    lines = [f"{'prompt':<34} {'max|dlogit|':>11} {'top-1':>6} {'ppl ' + ref:>16} {'ppl ' + cand:>16}  greedy"]
    for r in reports:
        label = repr(decode(r.ids))[:34] if decode else f"{len(r.ids)} ids {r.ids[:3]}..."
        same = "identical" if r.greedy_identical else "DIFFERENT"
        lines.append(
            f"{label:<34} {r.max_abs_logit_diff:>11.3e} {r.top1_agreement:>6.1%} "
            f"{r.perplexity_reference:>16.6g} {r.perplexity_candidate:>16.6g}  {same}"
        )
    worst = max(r.max_abs_logit_diff for r in reports)
    agree = sum(r.top1_agreement for r in reports) / len(reports)
    n_same = sum(r.greedy_identical for r in reports)
    n_new = len(reports[0].greedy_reference)
    lines.append(f"max |logit difference| over all prompts: {worst:.3e}")
    lines.append(f"top-1 agreement: {agree:.2%}")
    lines.append(f"greedy {n_new}-token generations identical: {n_same}/{len(reports)}")
    for r in reports:
        if decode and not r.greedy_identical:
            lines.append(f"  {ref}: {decode(r.greedy_reference)!r}\n  {cand}: {decode(r.greedy_candidate)!r}")
    return "\n".join(lines)

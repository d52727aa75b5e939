"""Choosing the next token from the last position's logits: greedy, temperature, top-k, top-p.

Sampling runs on the host, in float64 NumPy, on the (V,) logits of the last position, with
a seeded `np.random.Generator` that is advanced by exactly one `random()` draw per sampled
token. The device only computes logits; everything random happens here, so the same seed
gives the same text on every backend (as far as the backends agree on the logits).

The filters are applied in the order Hugging Face `transformers` uses:

1. temperature: logits / T. T = 0 (or `greedy`) means argmax, ties to the lowest id.
2. top-k: keep the k largest logits (ties at the boundary go to the lowest ids).
3. top-p (nucleus): of what is left, keep the smallest set of most likely tokens whose
   probability mass reaches p.

A token is then drawn by inverting the cumulative distribution of the kept tokens.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. `temperature=0` is the same as `greedy=True`."""

    temperature: float = 1.0
    top_k: int | None = None  # None: no top-k filter
    top_p: float | None = None  # None: no nucleus filter
    greedy: bool = False

    def __post_init__(self):
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        k = self.top_k
        if k is not None and (not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1):
            raise ValueError(f"top_k must be a whole number >= 1, got {k!r}")
        p = self.top_p
        if p is not None and (not _is_real(p) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def next_token_distribution(logits, config: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """The tokens that may be drawn and their probabilities, after all filters.

    logits (V,) -> (ids (n,) int64 ascending, probs (n,) float64 summing to 1).
    Greedy gives the single argmax with probability 1.
    """
    z = _host_float64(logits)
    if config.is_greedy:
        return np.array([_argmax(z)], dtype=np.int64), np.ones(1)
    z = (z - z.max()) / config.temperature  # shift first: a tiny T cannot overflow to inf
    ids = np.arange(z.shape[0], dtype=np.int64) if config.top_k is None else np.sort(_top_ids(z, config.top_k))
    probs = _softmax(z[ids])
    if config.top_p is not None:
        keep = np.sort(_nucleus(probs, config.top_p))
        ids, probs = ids[keep], probs[keep] / probs[keep].sum()
    return ids, probs


def sample(logits, config: SamplingConfig, rng: np.random.Generator) -> int:
    """One token id drawn from `logits` (V,) under `config`; one `rng.random()` per call
    unless greedy (which draws nothing)."""
    if config.is_greedy:
        return _argmax(logits)  # float64 would pick the same id: no copy
    ids, probs = next_token_distribution(logits, config)
    return int(ids[_draw(probs, rng)])


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _host_float64(logits) -> np.ndarray:
    return np.asarray(_checked(logits), dtype=np.float64)


BROKEN = "logits contain NaN or +inf (or are all -inf): the model output is broken"


def _checked(logits) -> np.ndarray:
    """The logits as a host array, checked: one position (V,), no NaN or +inf, not all -inf
    (a NaN anywhere makes the max NaN)."""
    z = _one_position(logits)
    if not np.isfinite(z.max()):
        raise ValueError(BROKEN)
    return z


def _one_position(logits) -> np.ndarray:
    """The logits as a host array of one position (V,)."""
    z = np.asarray(logits)
    if z.ndim != 1 or z.shape[0] == 0:
        raise ValueError(f"expected the logits of one position, shape (V,), got shape {z.shape}")
    return z


def _argmax(logits) -> int:
    """The first maximum's id (ties go to the lowest id), checked as `_checked` checks, in
    one pass: argmax lands on the first NaN, else on +inf if any, or on -inf when all are."""
    z = _one_position(logits)
    i = int(np.argmax(z))
    if not np.isfinite(z[i]):
        raise ValueError(BROKEN)
    return i


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values (unordered), ties at the boundary broken by lowest id.

    O(V) with a partition, instead of the O(V log V) full sort that costs ~5 ms per token at
    GPT-2's V = 50257.
    """
    n = values.shape[0]
    if k >= n:
        return np.arange(n, dtype=np.int64)
    kth = np.partition(values, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(values > kth)
    tied = np.flatnonzero(values == kth)[: k - above.shape[0]]
    return np.concatenate([above, tied])


def _nucleus(probs: np.ndarray, p: float) -> np.ndarray:
    """Indices of the smallest most-likely-first set of `probs` whose mass reaches p.

    Looks at the top 64, 256, ... candidates until their mass reaches p, so a peaked
    distribution never pays for sorting all V. The cumulative sum over a prefix equals the
    prefix of the full cumulative sum, so the answer does not depend on where it stops.
    """
    n = min(64, probs.shape[0])
    while True:
        ids = _top_ids(probs, n)
        ids = ids[np.lexsort((ids, -probs[ids]))]  # most likely first, ties by lowest id
        mass = np.cumsum(probs[ids])
        if mass[-1] >= p or n == probs.shape[0]:
            return ids[: min(int(np.searchsorted(mass, p)) + 1, n)]
        n = min(4 * n, probs.shape[0])


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability probs[i], by inverting the cumulative distribution.

    Zero-probability entries are never drawn: searchsorted(side="right") returns the first
    i with cdf[i] > u, and a zero entry has the same cdf as the entry before it.
    """
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), probs.shape[0] - 1)

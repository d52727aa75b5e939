"""Sampling: greedy, temperature, top-k, top-p, checked as properties and statistically."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from npgpt.sampling import SamplingConfig, next_token_distribution, sample

logits_st = arrays(np.float32, st.integers(2, 40), elements=st.floats(-20, 20, width=32))
seeds = st.integers(0, 2**32 - 1)


def softmax64(z):
    e = np.exp(np.asarray(z, np.float64) - np.max(z))
    return e / e.sum()


# -- properties -------------------------------------------------------------------------
@given(logits_st, st.integers(1, 50), st.floats(0.05, 5), seeds)
def test_top_k_never_emits_outside_the_k_most_likely(logits, k, temperature, seed):
    token = sample(logits, SamplingConfig(temperature=temperature, top_k=k), np.random.default_rng(seed))
    kth_largest = np.sort(logits)[::-1][min(k, len(logits)) - 1]
    assert logits[token] >= kth_largest
    ids, _ = next_token_distribution(logits, SamplingConfig(temperature=temperature, top_k=k))
    assert len(ids) == min(k, len(logits))


@given(logits_st, st.floats(0.01, 1.0), st.floats(0.05, 5), seeds)
def test_top_p_keeps_exactly_the_nucleus(logits, p, temperature, seed):
    """The kept set is the most likely tokens, its mass reaches p, and it is the smallest
    such set; the sampled token is always in it."""
    config = SamplingConfig(temperature=temperature, top_p=p)
    ids, kept_probs = next_token_distribution(logits, config)
    probs = softmax64(np.asarray(logits, np.float64) / temperature)
    kept = np.zeros(len(logits), bool)
    kept[ids] = True
    tol = 1e-9
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max() - tol  # most likely first
    assert probs[kept].sum() >= p - tol  # reaches p
    assert probs[kept].sum() - probs[kept].min() < p + tol  # smallest: one fewer would not
    np.testing.assert_allclose(kept_probs, probs[ids] / probs[ids].sum(), rtol=1e-9)
    assert kept[sample(logits, config, np.random.default_rng(seed))]


@given(logits_st, seeds, st.sampled_from([None, 1, 3]), st.sampled_from([None, 0.5, 1.0]))
def test_temperature_to_zero_equals_greedy(logits, seed, top_k, top_p):
    top_two = np.sort(logits.astype(np.float64))[-2:]
    assume(top_two[1] - top_two[0] > 1e-3)  # a unique maximum
    greedy = sample(logits, SamplingConfig(greedy=True), np.random.default_rng(seed))
    assert greedy == int(np.argmax(logits))
    for temperature in (1e-6, 1e-12, 1e-300, 0.0):
        config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        assert sample(logits, config, np.random.default_rng(seed)) == greedy


@given(logits_st, seeds)
def test_same_seed_same_token_and_one_draw_per_token(logits, seed):
    """Reproducibility rests on this: a sample consumes exactly one uniform draw."""
    config = SamplingConfig(temperature=0.9, top_k=10, top_p=0.9)
    rng_a, rng_b, rng_ref = (np.random.default_rng(seed) for _ in range(3))
    assert sample(logits, config, rng_a) == sample(logits, config, rng_b)
    rng_ref.random()
    assert rng_a.random() == rng_ref.random()


@settings(max_examples=50)
@given(st.integers(2, 30), seeds)
def test_masked_tokens_are_never_drawn(n, seed):
    logits = np.full(n, -np.inf)
    allowed = np.random.default_rng(seed).choice(n, size=max(1, n // 3), replace=False)
    logits[allowed] = 0.0
    rng = np.random.default_rng(seed)
    assert all(sample(logits, SamplingConfig(), rng) in allowed for _ in range(20))


def test_greedy_ties_go_to_the_lowest_id():
    assert sample(np.array([1.0, 3.0, 3.0, 2.0]), SamplingConfig(greedy=True), np.random.default_rng(0)) == 1
    ids, _ = next_token_distribution(np.array([5.0, 1.0, 1.0, 1.0]), SamplingConfig(top_k=2))
    assert ids.tolist() == [0, 1]


def test_large_vocabulary_top_p_matches_a_full_sort():
    """The incremental nucleus search (top 64, 256, ...) gives the full sort's answer."""
    logits = np.random.default_rng(0).normal(size=50257).astype(np.float32) * 3
    for p in (0.1, 0.5, 0.9, 0.999):
        ids, _ = next_token_distribution(logits, SamplingConfig(top_p=p))
        probs = softmax64(logits)
        order = np.argsort(-probs, kind="stable")
        n = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1
        assert set(ids.tolist()) == set(order[:n].tolist())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_invalid_sampling_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("logits", [[0.0, np.nan, 1.0], [np.nan, 0.0], [0.0, np.inf], [-np.inf, -np.inf]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_broken_logits_are_reported(logits, greedy, dtype):
    with pytest.raises(ValueError, match="NaN"):
        sample(np.array(logits, dtype=dtype), SamplingConfig(greedy=greedy), np.random.default_rng(0))


def test_greedy_on_float32_logits_picks_the_first_maximum():
    logits = np.array([0.5, 2.0, -1.0, 2.0], dtype=np.float32)
    assert sample(logits, SamplingConfig(greedy=True), np.random.default_rng(0)) == 1


# -- the distribution itself: a chi-square goodness-of-fit test ------------------------
def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df), by the series of the regularized lower incomplete
    gamma function P(df/2, x/2) (plenty accurate for the small df used here)."""
    a, y = df / 2, x / 2
    term = total = 1 / a
    n = 0
    while term > 1e-17 * total:
        n += 1
        term *= y / (a + n)
        total += term
    return max(0.0, 1 - math.exp(a * math.log(y) - y - math.lgamma(a)) * total) if y > 0 else 1.0


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of observed counts (V,) to probabilities (V,); a draw where the
    probability is zero is an outright failure (p = 0)."""
    support = probs > 0
    if counts[~support].any():
        return 0.0
    expected = probs[support] * counts.sum()
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    return chi2_sf(statistic, int(support.sum()) - 1)


def test_chi2_sf_matches_known_critical_values():
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=1e-4)
    assert chi2_sf(16.919, 9) == pytest.approx(0.05, abs=1e-4)
    assert chi2_sf(24.322, 7) == pytest.approx(0.001, abs=1e-5)


LOGITS = np.array([2.0, 1.5, 1.0, 0.7, 0.0, -0.5, -1.0, -3.0, 0.3, 1.2])
CONFIG = SamplingConfig(temperature=0.8, top_k=8, top_p=0.97)


def expected_distribution(logits, temperature, k, p) -> np.ndarray:
    """The filtered distribution over all V, computed independently of npgpt (full sorts)."""
    order = np.argsort(-logits, kind="stable")[:k]
    probs = softmax64(logits[order] / temperature)  # already most likely first
    n = int(np.searchsorted(np.cumsum(probs), p)) + 1
    full = np.zeros(len(logits))
    full[order[:n]] = probs[:n] / probs[:n].sum()
    return full


def draw_counts(config, n=20000, seed=1234) -> np.ndarray:
    rng = np.random.default_rng(seed)
    draws = [sample(LOGITS, config, rng) for _ in range(n)]
    return np.bincount(draws, minlength=len(LOGITS))


def test_sampled_frequencies_match_the_distribution():
    probs = expected_distribution(LOGITS, 0.8, 8, 0.97)
    assert 4 <= (probs > 0).sum() < 8  # the filters really cut something
    assert chi_square_p_value(draw_counts(CONFIG), probs) > 1e-3


def test_chi_square_detects_a_wrong_distribution():
    """Negative controls: the same test rejects samplers that are subtly wrong, so the test
    above has the power to catch a real mistake."""
    probs = expected_distribution(LOGITS, 0.8, 8, 0.97)
    no_temperature = SamplingConfig(temperature=1.0, top_k=8, top_p=0.97)
    assert chi_square_p_value(draw_counts(no_temperature), probs) < 1e-6
    slightly_hotter = SamplingConfig(temperature=0.85, top_k=8, top_p=0.97)
    assert chi_square_p_value(draw_counts(slightly_hotter), probs) < 1e-3

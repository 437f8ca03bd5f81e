"""The library's distribution against a float64 NumPy reference.

probs(): the kept set equals the reference's and the total-variation
distance is within the contract's 1e-6. sample(): every token is kept, and
a chi-square test of 40,000 draws against the reference passes at the
0.1% level (fixed seeds: the outcome is reproducible, and a correct sampler
passes for 99.9% of seeds).
"""
import math

import numpy as np
import pytest

from reference import margins, reference_probs

SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=0.9, top_k=30, top_p=0.9, min_p=0.02),
]
DRAWS = 40_000
# Inputs whose top-p and min-p cutoffs lie clear of every prefix (checked
# by the test): at 151,936 tokens a prefix grows by about 1e-5 a token, so
# most random rows have a cutoff within the contract's 1e-6 of a boundary,
# where the exact and float64 kept sets may rightly differ.
DATA_SEEDS = {64: 64, 151_936: 17}
# Standard normal quantile for a one-sided 0.1% tail.
Z_999 = 3.090232306167813


def chi_square_critical(degrees):
    """The 99.9% quantile of chi-square(degrees), Wilson-Hilferty (relative
    error below 1% for 10 or more degrees of freedom)."""
    h = 2.0 / (9.0 * degrees)
    return degrees * (1.0 - h + Z_999 * math.sqrt(h)) ** 3


def logits_row(vocab, seed, scale=1.5):
    return np.random.default_rng(seed).normal(0.0, scale, size=vocab).astype(np.float32)


def test_chi_square_quantile_formula():
    # Wilson-Hilferty against tabulated chi-square 99.9% quantiles.
    assert chi_square_critical(10) == pytest.approx(29.588, rel=0.01)
    assert chi_square_critical(50) == pytest.approx(86.661, rel=0.01)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("vocab", [64, 151_936])
def test_probs_match_reference(context, setting, vocab):
    row = logits_row(vocab, seed=DATA_SEEDS[vocab])
    top_p_margin, min_p_margin = margins(row, **setting)
    # A prefix mass moves by at most the TV distance (1e-6): a cutoff farther
    # than twice that from every prefix cannot flip a token.
    assert min(top_p_margin, min_p_margin) > 2e-6, "test input too close to a cutoff"
    expected = reference_probs(row, **setting)
    got = context.probs(row, **setting).astype(np.float64)
    np.testing.assert_array_equal(got > 0, expected > 0)
    assert 0.5 * np.abs(got - expected).sum() <= 1e-6


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_chi_square_against_reference(context, setting):
    row = logits_row(64, seed=11)
    expected = reference_probs(row, **setting)
    tokens = context.sample(row, num_samples=DRAWS, seed=2024, **setting)
    assert tokens.shape == (DRAWS,)
    kept = np.flatnonzero(expected > 0)
    assert np.isin(tokens, kept).all(), "a token outside the kept set was drawn"
    counts = np.bincount(tokens, minlength=row.size)[kept].astype(np.float64)
    means = expected[kept] * DRAWS
    # Bins expected to hold fewer than 5 draws are pooled into one.
    small = means < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        means = np.append(means[~small], means[small].sum())
    statistic = float(((counts - means) ** 2 / means).sum())
    degrees = counts.size - 1
    assert degrees >= 10
    assert statistic < chi_square_critical(degrees), (statistic, degrees)


def test_logprobs_are_logs_of_probs(context):
    logits = np.random.default_rng(3).normal(0, 2, size=(8, 5000)).astype(np.float32)
    setting = dict(temperature=0.8, top_k=100, top_p=0.95)
    tokens, logprobs = context.sample(logits, num_samples=16, seed=9, return_logprobs=True,
                                      **setting)
    probs = context.probs(logits, **setting)
    assert tokens.shape == logprobs.shape == (8, 16)
    assert tokens.dtype == np.int32 and logprobs.dtype == np.float32
    drawn = np.take_along_axis(probs, tokens, axis=1)
    assert (drawn > 0).all()
    np.testing.assert_allclose(np.exp(logprobs.astype(np.float64)), drawn, rtol=2e-6)


def test_greedy_is_argmax_lowest_index_on_ties(context):
    logits = np.random.default_rng(5).normal(size=(6, 1000)).astype(np.float32)
    logits[2, 10] = logits[2, 700] = logits[2].max() + 1.0
    tokens, logprobs = context.sample(logits, temperature=0.0, num_samples=3,
                                      return_logprobs=True, seed=1)
    expected = np.argmax(logits, axis=1)
    assert expected[2] == 10
    np.testing.assert_array_equal(tokens, np.repeat(expected[:, None], 3, axis=1))
    np.testing.assert_array_equal(logprobs, 0.0)

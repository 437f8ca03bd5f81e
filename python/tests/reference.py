"""The contract's distribution (docs/SAMPLING.md) in float64 with NumPy.

Temperature, then top-k, top-p, min-p on the rank order (higher logit
first, lower index on ties), then a softmax over the kept tokens. The
library computes the same thing with exact integer weights; the two agree
to a total-variation distance of 1e-6 (the contract's precision promise),
and their kept sets agree whenever no cutoff lies within that distance of
a boundary, which `margins` lets a test assert.
"""
import numpy as np

GREEDY_TEMPERATURE = 1e-5


def rank_order(row):
    """Token indices, most probable first (ties: lower index first)."""
    return np.lexsort((np.arange(row.size), -row))


def reference_probs(row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """float64 probabilities of one row of finite logits."""
    row = np.asarray(row, dtype=np.float64)
    order = rank_order(row)
    if temperature < GREEDY_TEMPERATURE:
        probs = np.zeros(row.size)
        probs[order[0]] = 1.0
        return probs
    weights = np.exp((row - row[order[0]]) / np.float64(np.float32(temperature)))
    kept = np.zeros(row.size, dtype=bool)
    count = row.size if not 0 < top_k < row.size else top_k
    kept[order[:count]] = True
    if top_p < 1.0:
        ranked = weights[order[:count]]
        cumulative = np.cumsum(ranked) / ranked.sum()
        length = int(np.searchsorted(cumulative, np.float32(top_p), side="left")) + 1
        kept[:] = False
        kept[order[:min(length, count)]] = True
    if min_p > 0.0:
        kept &= weights >= np.float32(min_p)
    probs = np.where(kept, weights, 0.0)
    return probs / probs.sum()


def margins(row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """How far the top-p and min-p cutoffs are from flipping a token:
    (top-p: the smallest |cumulative mass - p| over the ranked candidates,
    min-p: the smallest |relative weight - min_p|)."""
    row = np.asarray(row, dtype=np.float64)
    order = rank_order(row)
    weights = np.exp((row - row[order[0]]) / np.float64(np.float32(temperature)))
    count = row.size if not 0 < top_k < row.size else top_k
    ranked = weights[order[:count]]
    cumulative = np.cumsum(ranked) / ranked.sum()
    top_p_margin = np.min(np.abs(cumulative - np.float32(top_p))) if top_p < 1.0 else np.inf
    min_p_margin = np.min(np.abs(weights - np.float32(min_p))) if min_p > 0.0 else np.inf
    return top_p_margin, min_p_margin

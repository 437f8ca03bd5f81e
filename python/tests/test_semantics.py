"""Seeds, offsets, per-row parameters and bad rows, as the C API defines them."""
import numpy as np
import pytest

import polysample


def batch(rows=6, vocab=3000, seed=0):
    return np.random.default_rng(seed).normal(0, 2, size=(rows, vocab)).astype(np.float32)


def test_same_seed_same_tokens_other_offset_other_tokens(context):
    logits = batch()
    first = context.sample(logits, seed=42, offset=7, num_samples=8)
    again = context.sample(logits, seed=42, offset=7, num_samples=8)
    later = context.sample(logits, seed=42, offset=8, num_samples=8)
    np.testing.assert_array_equal(first, again)
    assert (first != later).any()


def test_module_functions_equal_context_methods(context):
    logits = batch()
    setting = dict(temperature=0.9, top_k=40, top_p=0.9, seed=3, num_samples=4)
    np.testing.assert_array_equal(polysample.sample(logits, backend=context.backend, **setting),
                                  context.sample(logits, **setting))
    np.testing.assert_array_equal(polysample.probs(logits, backend=context.backend, top_k=40),
                                  context.probs(logits, top_k=40))


def test_per_row_parameters_equal_scalar_calls(context):
    logits = batch(rows=4)
    temperatures = [0.5, 1.0, 1.5, 0.0]
    top_ks = [0, 10, 50, 3]
    top_ps = [1.0, 0.9, 0.5, 0.7]
    min_ps = [0.0, 0.01, 0.0, 0.2]
    seeds = [1, 2**64 - 1, 12345, 0]
    tokens = context.sample(logits, temperature_per_row=temperatures, top_k_per_row=top_ks,
                            top_p_per_row=top_ps, min_p_per_row=min_ps, seed_per_row=seeds,
                            num_samples=5)
    for row in range(4):
        alone = context.sample(logits[row:row + 1], temperature=temperatures[row],
                               top_k=top_ks[row], top_p=top_ps[row], min_p=min_ps[row],
                               seed_per_row=[seeds[row]], num_samples=5)
        np.testing.assert_array_equal(tokens[row], alone[0])


def test_seed_per_row_makes_tokens_independent_of_row_position(context):
    logits = batch(rows=5)
    seeds = np.arange(100, 105, dtype=np.uint64)
    forward = context.sample(logits, seed_per_row=seeds, num_samples=4)
    backward = context.sample(logits[::-1].copy(), seed_per_row=seeds[::-1].copy(),
                              num_samples=4)
    np.testing.assert_array_equal(forward, backward[::-1])


def test_bad_rows_get_minus_one_and_nan(context):
    logits = batch(rows=4, vocab=100)
    logits[1, 5] = np.nan
    logits[2, :] = -np.inf
    logits[3, 9] = np.inf
    tokens, logprobs = context.sample(logits, num_samples=2, return_logprobs=True)
    assert (tokens[0] >= 0).all() and np.isfinite(logprobs[0]).all()
    np.testing.assert_array_equal(tokens[1:], -1)
    assert np.isnan(logprobs[1:]).all()
    probs = context.probs(logits)
    assert np.isnan(probs[1:]).all() and np.isfinite(probs[0]).all()


def test_check_rows_raises_bad_row(context):
    checking = polysample.Context(context.backend, check_rows=True)
    logits = batch(rows=3, vocab=100)
    logits[2, 0] = np.nan
    with pytest.raises(polysample.Error) as caught:
        checking.sample(logits)
    assert caught.value.status == "BAD_ROW"
    assert "row 2" in caught.value.message


def test_info_lists_every_backend():
    info = polysample.info()
    assert info["version"] == polysample.__version__
    assert set(info["backends"]) == {"cpu", "cuda", "hip", "opencl"}
    assert info["backends"]["cpu"]["compiled"] and info["backends"]["cpu"]["available"]
    for entry in info["backends"].values():
        assert entry["available"] or entry["reason"]


def test_context_reports_backend_and_device(context):
    assert context.backend in ("cpu", "cuda", "hip", "opencl")
    assert context.device_name
    assert context.selection_reason == "requested"
    context.reserve(4, 1000, 2)
    context.synchronize()

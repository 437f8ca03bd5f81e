"""Top-N logprobs and the ranks of drawn tokens (docs/SAMPLING.md section 6):
top_logprobs=N, logprob_mode and return_ranks on polysample.sample and
Context.sample. Processed mode against the float64 reference distribution
(tests/reference.py), raw mode against the float64 log-softmax, ranks by
brute force, and every output identical to the C tool's `sample
--top-logprobs`, on every backend."""
import json
import os
import subprocess

import numpy as np
import pytest

import polysample
from reference import margins, rank_order, reference_probs

VOCAB = 3000
COUNT = 20


def make_logits(rows, seed):
    logits = np.random.default_rng(seed).normal(0, 2, size=(rows, VOCAB)).astype(np.float32)
    logits[:, 7] = -np.inf  # masked: never a candidate
    return logits


def expected_list(row, candidates, logprob_of):
    """The first COUNT candidates in rank order, padded with -1 and -inf,
    and each candidate's rank."""
    order = [int(token) for token in rank_order(row) if candidates[token]]
    tokens = order[:COUNT] + [-1] * (COUNT - len(order[:COUNT]))
    logprobs = [logprob_of(token) for token in order[:COUNT]]
    logprobs += [-np.inf] * (COUNT - len(logprobs))
    ranks = {token: place + 1 for place, token in enumerate(order)}
    return tokens, np.array(logprobs), ranks


SETTINGS = [dict(temperature=1.0), dict(temperature=0.8, top_p=0.9),
            dict(temperature=0.7, top_k=12), dict(temperature=1.1, min_p=0.02)]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}{v}"
                                                                      for k, v in s.items()))
def test_processed_top_logprobs_follow_the_reference(context, setting):
    logits = make_logits(4, seed=21)
    result = context.sample(
        logits, num_samples=16, seed=5, top_logprobs=COUNT, return_ranks=True, **setting)
    assert isinstance(result, polysample.SampleResult)
    assert result.top_tokens.shape == (4, COUNT) and result.top_tokens.dtype == np.int32
    assert result.top_logprobs.shape == (4, COUNT) and result.top_logprobs.dtype == np.float32
    assert result.ranks.shape == (4, 16) and result.ranks.dtype == np.int32
    tokens, logprobs = context.sample(logits, num_samples=16, seed=5, return_logprobs=True,
                                      **setting)
    np.testing.assert_array_equal(result.tokens, tokens)
    np.testing.assert_array_equal(result.logprobs, logprobs)
    for row in range(4):
        finite = np.where(np.isfinite(logits[row]), logits[row], -np.inf)
        valid = np.isfinite(logits[row])
        probs = np.zeros(VOCAB)
        probs[valid] = reference_probs(logits[row][valid], **setting)
        # A prefix mass or a relative weight moves by at most the contract's
        # TV distance (1e-6): a cutoff farther than twice that from each
        # cannot flip a token, so the kept set is the reference's.
        assert min(margins(logits[row][valid], **setting)) > 2e-6, "input too close to a cutoff"
        want_tokens, want_logprobs, ranks = expected_list(
            finite, probs > 0, lambda token: np.log(probs[token]))
        assert result.top_tokens[row].tolist() == want_tokens
        np.testing.assert_allclose(result.top_logprobs[row], want_logprobs, rtol=1e-6,
                                   atol=1e-5)
        assert result.ranks[row].tolist() == [ranks[int(t)] for t in result.tokens[row]]


def test_raw_top_logprobs_are_the_log_softmax_as_given(context):
    logits = make_logits(3, seed=22)
    result = context.sample(
        logits, temperature=0.6, top_k=10, num_samples=8, seed=9, top_logprobs=COUNT,
        logprob_mode="raw", return_ranks=True)
    for row in range(3):
        valid = np.isfinite(logits[row])
        finite = np.where(valid, logits[row], -np.inf).astype(np.float64)
        top = finite.max()
        log_total = np.log(np.exp(finite[valid] - top).sum())
        want_tokens, want_logprobs, ranks = expected_list(
            finite, valid, lambda token: finite[token] - top - log_total)
        assert result.top_tokens[row].tolist() == want_tokens
        np.testing.assert_allclose(result.top_logprobs[row], want_logprobs, rtol=1e-6,
                                   atol=1e-5)
        assert result.ranks[row].tolist() == [ranks[int(t)] for t in result.tokens[row]]


def test_one_row_bad_rows_and_no_ranks(context):
    logits = make_logits(2, seed=23)
    logits[1, 40] = np.nan  # a bad row
    result = context.sample(
        logits, num_samples=3, top_logprobs=5)
    assert result.ranks is None
    assert result.top_tokens[1].tolist() == [-1] * 5
    assert np.isnan(result.top_logprobs[1]).all()
    assert result.tokens[1].tolist() == [-1] * 3
    one = context.sample(logits[0], num_samples=3, top_logprobs=5, return_ranks=True)
    assert one.tokens.shape == (3,) and one.top_tokens.shape == (5,) and one.ranks.shape == (3,)
    np.testing.assert_array_equal(one.top_tokens, result.top_tokens[0])
    np.testing.assert_array_equal(one.top_logprobs, result.top_logprobs[0])
    # Without top_logprobs the result is what it always was.
    assert isinstance(context.sample(logits), np.ndarray)


def test_module_function_and_workspace_size(context):
    logits = make_logits(2, seed=24)
    arguments = dict(num_samples=4, seed=3, top_logprobs=8, return_ranks=True)
    expected = context.sample(logits, **arguments)
    got = polysample.sample(logits, backend=context.backend, **arguments)
    for name in polysample.SampleResult._fields:
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))
    assert context.sample_workspace_size(logits, **arguments) >= \
        context.sample_workspace_size(logits, num_samples=4)


@pytest.mark.parametrize("arguments, status, fragment", [
    (dict(top_logprobs=65), "INVALID_PARAMETER", "top_logprobs is 65"),
    (dict(top_logprobs=-1), "INVALID_PARAMETER", "top_logprobs is -1"),
    (dict(top_logprobs=2.5), "INVALID_ARGUMENT", "top_logprobs must be an integer"),
    (dict(top_logprobs=4, logprob_mode="final"), "INVALID_ARGUMENT", "logprob_mode"),
    (dict(return_ranks=True), "INVALID_ARGUMENT", "return_ranks needs top_logprobs"),
])
def test_bad_top_logprobs_arguments(arguments, status, fragment):
    with pytest.raises(polysample.Error) as caught:
        polysample.sample(make_logits(1, seed=25), **arguments)
    assert caught.value.status == status, caught.value
    assert fragment in caught.value.message, caught.value.message


CLI = os.environ.get("POLYSAMPLE_CLI")


@pytest.mark.skipif(not CLI, reason="POLYSAMPLE_CLI (path of the C `polysample` tool) is not "
                                    "set")
@pytest.mark.parametrize("mode", ["processed", "raw"])
def test_top_logprobs_equal_the_cli(context, tmp_path, mode):
    logits = make_logits(5, seed=26)
    logits[2, 11] = np.nan
    path = tmp_path / "logits.npy"
    np.save(path, logits)
    command = [CLI, "sample", "--backend", context.backend, "--json", "--temperature", "0.9",
               "--top-p", "0.95", "--seed", "77", "--num-samples", "3", "--top-logprobs",
               str(COUNT), str(path)] + (["--raw-logprobs"] if mode == "raw" else [])
    result = context.sample(
        logits, temperature=0.9, top_p=0.95, seed=77, num_samples=3, top_logprobs=COUNT,
        logprob_mode=mode, return_ranks=True)
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    expected = json.loads(completed.stdout)
    assert result.tokens.tolist() == expected["tokens"]
    assert result.ranks.tolist() == expected["ranks"]
    assert result.top_tokens.tolist() == [[entry[0] for entry in row]
                                          for row in expected["top_logprobs"]]
    # The tool prints 9 significant digits (exact for float32); null is
    # NaN for a bad row and -inf past the last candidate.
    printed = np.array([[np.nan if entry[1] is None else entry[1] for entry in row]
                        for row in expected["top_logprobs"]], dtype=np.float32)
    printed[np.isnan(printed) & (result.top_tokens == -1) & ~np.isnan(result.top_logprobs)] = \
        -np.inf
    np.testing.assert_array_equal(result.top_logprobs, printed)


def test_torch_tensors_in_torch_tensors_out():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    logits = make_logits(3, seed=27)
    arguments = dict(num_samples=5, seed=12, top_logprobs=6, return_ranks=True, top_p=0.9)
    expected = polysample.sample(logits, **arguments)
    for got in (polysample.sample(torch.from_numpy(logits), **arguments),
                polysample.Context("cpu").sample(torch.from_numpy(logits), **arguments)):
        assert isinstance(got, polysample.SampleResult)
        for name in polysample.SampleResult._fields:
            assert isinstance(getattr(got, name), torch.Tensor), name
            np.testing.assert_array_equal(getattr(got, name).numpy(), getattr(expected, name))

"""Request state: row gather, per-row offsets, subsequences, the seed and
offset as one-element arrays, and the caller's workspace (issue 12)."""
import numpy as np
import pytest

import polysample

VOCAB = 2000


def batch(rows, seed=0, spread=2.0):
    return np.random.default_rng(seed).normal(0, spread, size=(rows, VOCAB)).astype(np.float32)


def test_row_gather_equals_sampling_the_copied_rows(context):
    logits = batch(4, seed=1)
    indices = np.array([3, 0, 3, 2, 1, 3], dtype=np.int64)
    setting = dict(temperature=0.9, top_k=200, top_p=0.95, seed=8, offset=2, num_samples=4,
                   temperature_per_row=[0.5, 1.0, 1.5, 0.0, 0.7, 1.0])
    tokens, logprobs = context.sample(logits, row_indices=indices, return_logprobs=True,
                                      **setting)
    assert tokens.shape == logprobs.shape == (6, 4)
    copied = np.ascontiguousarray(logits[indices])
    expected_tokens, expected_logprobs = context.sample(copied, return_logprobs=True, **setting)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(logprobs, expected_logprobs)
    probs = context.probs(logits, row_indices=list(indices), top_k=200)
    assert probs.shape == (6, VOCAB)
    np.testing.assert_array_equal(probs, context.probs(copied, top_k=200))


def test_row_gather_from_one_dimensional_logits(context):
    row = batch(1, seed=2)[0]
    tokens = context.sample(row, row_indices=[0, 0, 0], subsequence_per_row=[0, 1, 2], seed=4)
    assert tokens.shape == (3, 1)
    np.testing.assert_array_equal(
        tokens, context.sample(np.stack([row] * 3), subsequence_per_row=[0, 1, 2], seed=4))


def test_offset_per_row_equals_one_call_per_row_at_that_offset(context):
    logits = batch(4, seed=3, spread=0.5)
    offsets = np.array([0, 5, 2**63, 2**64 - 1], dtype=np.uint64)
    seeds = [3, 3, 9, 2**40]
    tokens = context.sample(logits, offset_per_row=offsets, seed_per_row=seeds, num_samples=6)
    for row in range(4):
        alone = context.sample(logits[row], offset=int(offsets[row]), seed_per_row=[seeds[row]],
                               num_samples=6)
        np.testing.assert_array_equal(tokens[row], alone, err_msg=f"row {row}")
    # Rows 0 and 1 differ only in their offset; near-uniform rows of 2000
    # tokens agree on 6 draws by chance with probability about 1e-20.
    assert (tokens[0] != context.sample(logits[1], seed_per_row=[3], num_samples=6)).any()


def test_subsequences_name_the_default_streams_and_draw_apart(context):
    rows = 64
    row = batch(1, seed=4, spread=0.3)
    gather = np.zeros(rows, dtype=np.int64)
    streams = np.arange(rows, dtype=np.uint32)
    setting = dict(row_indices=gather, offset=11, num_samples=4)
    # The default stream is the output row with one seed, 0 with per-row seeds.
    np.testing.assert_array_equal(context.sample(row, seed=5, **setting),
                                  context.sample(row, seed=5, subsequence_per_row=streams,
                                                 **setting))
    seeds = np.full(rows, 5, dtype=np.uint64)
    same = context.sample(row, seed_per_row=seeds, **setting)
    assert (same == same[0]).all(), "one seed, one offset, one stream: one draw"
    np.testing.assert_array_equal(
        same, context.sample(row, seed_per_row=seeds, subsequence_per_row=np.zeros(rows, np.int32),
                             **setting))
    apart = context.sample(row, seed_per_row=seeds, subsequence_per_row=streams, **setting)
    # Two rows of 4 draws from about 2000 near-uniform tokens agree with
    # probability about 6e-14; there are 2016 pairs.
    assert len({tuple(draws) for draws in apart.tolist()}) == rows


def test_seed_and_offset_arrays_equal_the_scalars(context):
    logits = batch(3, seed=5)
    expected = context.sample(logits, seed=2**64 - 2, offset=123, num_samples=3)
    tokens = context.sample(logits, seed_tensor=np.array([2**64 - 2], dtype=np.uint64),
                            offset_tensor=np.array([123], dtype=np.int64), num_samples=3)
    np.testing.assert_array_equal(tokens, expected)


def test_the_callers_workspace_gives_the_same_results(context):
    if context.backend != "cpu":
        pytest.skip(f"a NumPy workspace is host memory; the {context.backend} backend's is "
                    "device memory (the torch ops pass CUDA workspaces from torch's allocator)")
    logits = batch(5, seed=6)
    setting = dict(temperature=0.8, top_p=0.9, seed=5, num_samples=3, row_indices=[4, 1, 1],
                   offset_per_row=[7, 8, 9])
    size = context.sample_workspace_size(logits, return_logprobs=True, **setting)
    assert size > 0
    workspace = np.full(size, 0xA5, dtype=np.uint8)
    got = context.sample(logits, workspace=workspace, return_logprobs=True, **setting)
    expected = context.sample(logits, return_logprobs=True, **setting)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    probs_size = context.probs_workspace_size(logits, row_indices=[2, 0])
    np.testing.assert_array_equal(
        context.probs(logits, row_indices=[2, 0], workspace=np.zeros(probs_size, np.uint8)),
        context.probs(logits, row_indices=[2, 0]))
    # A larger workspace is fine.
    np.testing.assert_array_equal(
        polysample.sample(logits, workspace=np.zeros(size + 100, np.uint8), backend="cpu",
                          **setting), expected[0])


def raises(status, call, containing):
    with pytest.raises(polysample.Error) as caught:
        call()
    assert caught.value.status == status, caught.value
    assert containing in caught.value.message, caught.value.message


@pytest.mark.parametrize("arguments, status, fragment", [
    (dict(row_indices=[0, 3]), "INVALID_ARGUMENT", "row_indices[1] is 3; logits have 3 rows"),
    (dict(row_indices=[-1]), "INVALID_ARGUMENT", "row_indices[0] is -1"),
    (dict(row_indices=[]), "INVALID_ARGUMENT", "row_indices must be 1-D with at least one entry"),
    (dict(row_indices=np.zeros((2, 1), np.int64)), "INVALID_ARGUMENT", "row_indices must be 1-D"),
    (dict(row_indices=[0.5]), "INVALID_ARGUMENT", "integers"),
    (dict(row_indices=[2**63]), "INVALID_PARAMETER", "row_indices"),
    (dict(row_indices=[1, 1], offset_per_row=[1, 2, 3]), "INVALID_ARGUMENT", "one value per row (2)"),
    (dict(offset_per_row=[1, 2]), "INVALID_ARGUMENT", "one value per row (3)"),
    (dict(offset_per_row=[1, -2, 3]), "INVALID_PARAMETER", "offset_per_row"),
    (dict(offset_per_row=np.array([1, -2, 3])), "INVALID_PARAMETER", "negative"),
    (dict(subsequence_per_row=[0, 1, 2**32]), "INVALID_PARAMETER", "subsequence_per_row"),
    (dict(subsequence_per_row=np.array([0, 2**32, 1])), "INVALID_PARAMETER", "subsequence_per_row"),
    (dict(seed_tensor=np.array([1, 2], np.uint64)), "INVALID_ARGUMENT", "one value"),
    (dict(offset_tensor=7), "INVALID_ARGUMENT", "offset_tensor must be an array"),
    (dict(seed_tensor=[1], seed_per_row=[1, 2, 3]), "INVALID_ARGUMENT",
     "seed_pointer and seed_per_row are both set"),
    (dict(offset_tensor=[1], offset_per_row=[1, 2, 3]), "INVALID_ARGUMENT",
     "offset_pointer and offset_per_row are both set"),
    (dict(workspace=np.zeros(16, np.uint8)), "INVALID_ARGUMENT", "workspace_bytes is 16"),
    (dict(workspace=np.zeros(1 << 20, np.float32)), "INVALID_ARGUMENT", "uint8"),
    (dict(workspace=np.zeros((2, 1 << 20), np.uint8)), "INVALID_ARGUMENT", "1-D contiguous"),
    (dict(workspace=np.zeros(1 << 21, np.uint8)[::2]), "INVALID_ARGUMENT", "1-D contiguous"),
])
def test_bad_request_state_raises_with_the_status(arguments, status, fragment):
    context = polysample.Context("cpu")
    logits = batch(3, seed=7)
    raises(status, lambda: context.sample(logits, **arguments), fragment)


def test_a_failed_call_writes_nothing_into_the_workspace():
    context = polysample.Context("cpu")
    logits = batch(3, seed=8)
    workspace = np.full(context.sample_workspace_size(logits), 0x5A, np.uint8)
    raises("INVALID_ARGUMENT", lambda: context.sample(logits, row_indices=[9], workspace=workspace),
           "row_indices[0] is 9")
    assert (workspace == 0x5A).all()


def test_workspace_size_refuses_unknown_arguments():
    raises("INVALID_ARGUMENT",
           lambda: polysample.Context("cpu").sample_workspace_size(batch(1), workspace=None),
           "unknown arguments ['workspace']")


def test_a_host_workspace_is_refused_on_opencl():
    entry = polysample.info()["backends"]["opencl"]
    if not entry["available"]:
        pytest.skip(f"opencl backend not available: {entry['reason']}")
    context = polysample.Context("opencl")
    raises("UNSUPPORTED", lambda: context.sample(batch(2), workspace=np.zeros(1 << 20, np.uint8)),
           "cl_mem")

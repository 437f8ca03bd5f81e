"""Sharded calls (docs/SAMPLING.md section 8): every rank's result equals
Context.sample(..., return_logprobs=True) on the whole rows, bit for bit,
for splits at and inside tiles and shard orders unlike the column order;
misuse and refusals raise with the library's message."""
import numpy as np
import pytest

import polysample

ROWS, VOCAB = 3, 4000


def run(context, logits, cuts, order, **arguments):
    """Every rank's call in turn; each round's all-gather is a concatenation
    in shard_index order. Returns each rank's (tokens, logprobs)."""
    edges = [0] + list(cuts) + [logits.shape[-1]]
    count = len(edges) - 1
    calls = [None] * count
    for k in range(count):
        calls[order[k]] = context.sharded(
            logits[:, edges[k]:edges[k + 1]], first_token=edges[k], full_vocab=logits.shape[-1],
            shard_index=order[k], shard_count=count, **arguments)
    gathered = None
    for _ in range(40):
        sent = [call.next(gathered) for call in calls]
        if sent[0] is None:
            assert all(part is None for part in sent)
            return [call.result() for call in calls]
        assert len({len(part) for part in sent}) == 1, [len(part) for part in sent]
        gathered = b"".join(sent)
    raise AssertionError("more than 40 rounds")


def runs_sharded(context):
    """Skips, after checking the refusal, on a backend without sharded calls."""
    logits = np.zeros((1, 8), np.float32)
    try:
        context.sharded(logits, first_token=0, full_vocab=8, shard_index=0, shard_count=1)
    except polysample.Error as refused:
        assert refused.status == "UNSUPPORTED", refused
        pytest.skip(f"{context.backend}: refused as it should be ({refused})")


@pytest.mark.parametrize("arguments", [
    dict(temperature=0.8, seed=3, num_samples=2),
    dict(temperature=0.8, top_p=0.9, seed=4),
    dict(temperature=1.1, top_k=40, top_p=0.8, min_p=0.02, seed=5, num_samples=3),
    dict(temperature=0.7, min_p=0.1, seed_per_row=np.array([11, 12, 13], np.uint64)),
    dict(temperature=0.9, top_p=0.95, row_indices=np.array([2, 0, 2, 1], np.int64)),
    dict(temperature=0.0),
], ids=["plain", "top_p", "combined", "per_row_seeds", "gather", "greedy"])
@pytest.mark.parametrize("split", [
    ((), (0,)), ((2048,), (1, 0)), ((1500, 1501, 3900), (2, 0, 3, 1)),
    ((300, 600, 900, 1200), (4, 3, 2, 1, 0)),
], ids=["whole", "tile_edge", "inside_tiles", "small_shards"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_rank_equals_the_unsharded_call(context, arguments, split, dtype):
    runs_sharded(context)
    logits = np.random.default_rng(7).normal(0, 2, size=(ROWS, VOCAB)).astype(dtype)
    tokens, logprobs = context.sample(logits, return_logprobs=True, **arguments)
    for rank, (rank_tokens, rank_logprobs) in enumerate(run(context, logits, *split, **arguments)):
        assert rank_tokens.dtype == np.int32 and rank_tokens.shape == tokens.shape
        np.testing.assert_array_equal(rank_tokens, tokens, err_msg=f"rank {rank}")
        np.testing.assert_array_equal(rank_logprobs.view(np.uint32), logprobs.view(np.uint32),
                                      err_msg=f"rank {rank}: logprob bits")


def test_misuse_and_refusals(context):
    runs_sharded(context)
    logits = np.zeros((2, 100), np.float32)
    with pytest.raises(polysample.Error, match="shard_count"):
        context.sharded(logits, first_token=0, full_vocab=100, shard_index=0, shard_count=0)
    with pytest.raises(polysample.Error, match="outside the full row"):
        context.sharded(logits, first_token=50, full_vocab=120, shard_index=0, shard_count=2)
    with pytest.raises(polysample.Error, match="first_token"):
        context.sharded(logits, first_token=-1, full_vocab=100, shard_index=0, shard_count=1)
    call = context.sharded(logits, first_token=0, full_vocab=200, shard_index=0, shard_count=2)
    with pytest.raises(polysample.Error, match="not finished"):
        call.result()
    first = call.next()
    assert isinstance(first, bytes) and len(first) > 0
    with pytest.raises(polysample.Error, match="gathered_bytes") as wrong:
        call.next(first)  # one rank's bytes where two were expected
    assert wrong.value.status == "INVALID_ARGUMENT"
    with pytest.raises(polysample.Error, match="finished"):
        call.next(first + first)

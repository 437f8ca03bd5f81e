"""Layouts: what is read in place, converted, or refused.

Read in place: C-contiguous arrays and any 2-D view whose last dimension is
contiguous, whatever its row stride (e.g. logits[:, -1, :] of a 3-D array,
or a column slice of a wider array); 1-D arrays as one row; read-only
arrays. Refused with a message: a last dimension with stride != 1
(transposed, Fortran order, reversed or stepped columns) and row strides
below the vocabulary (reversed, overlapping or broadcast rows).
"""
import numpy as np
import pytest

import polysample

SETTING = dict(temperature=0.9, top_k=50, top_p=0.9, seed=77, num_samples=3)


@pytest.fixture(scope="module")
def wide():
    return np.random.default_rng(1).normal(0, 2, size=(5, 4, 1200)).astype(np.float32)


def test_row_strided_view_is_read_in_place(context, wide):
    last = wide[:, -1, :]
    assert not last.flags.c_contiguous and last.strides[1] == 4
    np.testing.assert_array_equal(context.sample(last, **SETTING),
                                  context.sample(np.ascontiguousarray(last), **SETTING))
    np.testing.assert_array_equal(context.probs(last), context.probs(last.copy()))


def test_column_slice_is_read_in_place(context, wide):
    part = wide[:, 0, :1000]
    np.testing.assert_array_equal(context.sample(part, **SETTING),
                                  context.sample(part.copy(), **SETTING))


def test_one_dimensional_logits_are_one_row(context, wide):
    row = wide[2, 1]
    tokens, logprobs = context.sample(row, return_logprobs=True, **SETTING)
    assert tokens.shape == logprobs.shape == (3,)
    np.testing.assert_array_equal(tokens, context.sample(row[None, :], **SETTING)[0])
    assert context.probs(row).shape == (1200,)


def test_read_only_logits(context, wide):
    frozen = wide[:, 0, :].copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(context.sample(frozen, **SETTING),
                                  context.sample(frozen.copy(), **SETTING))


def test_float16_logits(context, wide):
    half = wide[:, 0, :].astype(np.float16)
    tokens = context.sample(half, **SETTING)
    # float16 values are exactly float32 values: the same tokens either way.
    np.testing.assert_array_equal(tokens, context.sample(half.astype(np.float32), **SETTING))


@pytest.mark.parametrize("make, fragment", [
    (lambda a: a[:, 0, :].T, "last dimension must be contiguous"),
    (lambda a: np.asfortranarray(a[:, 0, :]), "last dimension must be contiguous"),
    (lambda a: a[:, 0, ::-1], "last dimension must be contiguous"),
    (lambda a: a[:, 0, ::2], "last dimension must be contiguous"),
    (lambda a: a[::-1, 0, :], "row stride"),
    (lambda a: np.broadcast_to(a[0, 0], (3, 1200)), "row stride"),
    (lambda a: np.lib.stride_tricks.as_strided(a, shape=(4, 1200), strides=(400, 4)),
     "row stride"),
])
def test_refused_layouts(context, wide, make, fragment):
    with pytest.raises(polysample.Error) as caught:
        context.sample(make(wide))
    assert caught.value.status == "INVALID_ARGUMENT"
    assert fragment in caught.value.message
    assert "ascontiguousarray" in caught.value.message


class HostDLPackArray:
    """A stand-in for another framework's host array: DLPack only."""

    def __init__(self, array):
        self._array = array
        self.shape = array.shape

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_other_host_frameworks_are_read_through_dlpack(context, wide):
    logits = wide[:, 0, :].copy()
    tokens = context.sample(HostDLPackArray(logits), **SETTING)
    assert isinstance(tokens, np.ndarray)  # its module has no from_dlpack
    np.testing.assert_array_equal(tokens, context.sample(logits, **SETTING))
    seeds = HostDLPackArray(np.arange(5, dtype=np.uint64))
    np.testing.assert_array_equal(context.sample(HostDLPackArray(logits), seed_per_row=seeds),
                                  context.sample(logits, seed_per_row=np.arange(5)))

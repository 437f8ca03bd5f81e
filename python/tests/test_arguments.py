"""Every bad argument raises polysample.Error, with the status and a message
naming what is wrong, before any work."""
import numpy as np
import pytest

import polysample

LOGITS = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)


def raises(status, call, *, containing=""):
    with pytest.raises(polysample.Error) as caught:
        call()
    assert caught.value.status == status, caught.value
    assert containing in caught.value.message, caught.value.message
    assert caught.value.code == polysample._errors.STATUS_CODES[status]
    return caught.value


@pytest.mark.parametrize("name, value, fragment", [
    ("temperature", -0.5, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("temperature", 2e6, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("min_p", -0.1, "min_p"),
    ("min_p", 1.1, "min_p"),
    ("top_k", -1, "top_k"),
    ("top_k", 2**31, "top_k"),
    ("num_samples", 0, "num_samples"),
    ("num_samples", 2**31, "num_samples"),
    ("seed", -1, "seed"),
    ("seed", 2**64, "seed"),
    ("offset", -1, "offset"),
])
def test_scalar_out_of_range(context, name, value, fragment):
    raises("INVALID_PARAMETER", lambda: context.sample(LOGITS, **{name: value}),
           containing=fragment)


@pytest.mark.parametrize("name, value", [
    ("temperature", "hot"), ("top_k", 2.5), ("seed", 1.0), ("num_samples", None),
])
def test_scalar_of_wrong_type(context, name, value):
    raises("INVALID_ARGUMENT", lambda: context.sample(LOGITS, **{name: value}), containing=name)


@pytest.mark.parametrize("logits, fragment", [
    (LOGITS.astype(np.float64), "float32, float16 or bfloat16"),
    (LOGITS.astype(np.int32), "float32, float16 or bfloat16"),
    (LOGITS.reshape(3, 5, 10), "1-D or 2-D"),
    (np.float32(1.0), "1-D or 2-D"),
    (np.zeros((0, 50), np.float32), "at least one row"),
    (np.zeros((3, 0), np.float32), "at least one row"),
])
def test_bad_logits(context, logits, fragment):
    raises("INVALID_ARGUMENT", lambda: context.sample(logits), containing=fragment)


def test_logits_that_are_not_arrays(context):
    raises("INVALID_ARGUMENT", lambda: context.sample([[0.0, 1.0]]), containing="array")
    raises("INVALID_ARGUMENT", lambda: context.sample("logits"), containing="array")


@pytest.mark.parametrize("name, value, status, fragment", [
    ("temperature_per_row", [1.0, 1.0], "INVALID_ARGUMENT", "one value per row"),
    ("temperature_per_row", np.ones((3, 1), np.float32), "INVALID_ARGUMENT", "one value per row"),
    ("temperature_per_row", ["a", "b", "c"], "INVALID_ARGUMENT", "real numbers"),
    ("temperature_per_row", [1.0, -1.0, 1.0], "INVALID_PARAMETER", "temperature"),
    ("top_k_per_row", [1.5, 2.0, 3.0], "INVALID_ARGUMENT", "integers"),
    ("top_k_per_row", [1, 2, 2**31], "INVALID_PARAMETER", "top_k_per_row"),
    ("top_k_per_row", [1, -2, 3], "INVALID_PARAMETER", "top_k"),
    ("top_p_per_row", [0.5, 1.5, 1.0], "INVALID_PARAMETER", "top_p"),
    ("min_p_per_row", [0.5, 0.1, -0.2], "INVALID_PARAMETER", "min_p"),
    ("seed_per_row", [1, -1, 2], "INVALID_PARAMETER", "seed_per_row"),
    ("seed_per_row", np.array([1, -1, 2]), "INVALID_PARAMETER", "negative"),
    ("seed_per_row", [1.0, 2.0, 3.0], "INVALID_ARGUMENT", "integers"),
])
def test_bad_per_row_arrays(context, name, value, status, fragment):
    raises(status, lambda: context.sample(LOGITS, **{name: value}), containing=fragment)


def test_strided_per_row_array_is_copied_contiguous(context):
    seeds = np.arange(6, dtype=np.uint64)[::2]
    np.testing.assert_array_equal(context.sample(LOGITS, seed_per_row=seeds),
                                  context.sample(LOGITS, seed_per_row=seeds.copy()))


@pytest.mark.parametrize("backend, status", [
    ("gpu", "INVALID_ARGUMENT"),
    ("cpu:x", "INVALID_ARGUMENT"),
    (3, "INVALID_ARGUMENT"),
])
def test_bad_backend_names(backend, status):
    raises(status, lambda: polysample.sample(LOGITS, backend=backend), containing="backend")


def test_backend_not_compiled_or_without_device():
    info = polysample.info()["backends"]
    missing = [name for name in ("cuda", "hip") if not info[name]["available"]]
    if not missing:
        pytest.skip("every GPU backend is available here")
    name = missing[0]
    status = "NO_DEVICE" if info[name]["compiled"] else "BACKEND_NOT_COMPILED"
    raises(status, lambda: polysample.Context(name))


def test_device_arrays_of_other_frameworks_are_refused():
    class DeviceArray:
        shape = (3, 50)

        def __dlpack__(self, **kwargs):
            raise AssertionError("must not be read")

        def __dlpack_device__(self):
            return (2, 0)  # CUDA

    raises("UNSUPPORTED", lambda: polysample.sample(DeviceArray()), containing="torch.from_dlpack")

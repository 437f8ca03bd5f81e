"""Which array framework an input comes from, and how to answer in it.

NumPy arrays get NumPy results. Host arrays of other DLPack frameworks are
read through DLPack; their results are made as NumPy arrays and handed back
through the `from_dlpack` of the input's framework where it has one (JAX:
jax.numpy.from_dlpack), else returned as NumPy. PyTorch tensors take their
own path (polysample/torch.py). Device arrays of frameworks other than
PyTorch are refused: polysample cannot allocate their outputs; wrap them
with torch.from_dlpack(x) (no copy) instead.
"""
import importlib
import operator
import sys

import numpy as np

from ._errors import Error

DL_CPU = 1
DL_CUDA_HOST = 3
DL_ROCM_HOST = 11
HOST_DEVICE_TYPES = (DL_CPU, DL_CUDA_HOST, DL_ROCM_HOST)


def is_torch_tensor(value):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def dlpack_device(value):
    """(DLPack device type, index); arrays without __dlpack_device__ are host."""
    device = getattr(value, "__dlpack_device__", None)
    if device is None:
        return DL_CPU, 0
    device_type, index = device()
    return int(device_type), int(index)


def _from_dlpack_of(value):
    """The from_dlpack of the value's framework, or None for NumPy results."""
    root = type(value).__module__.partition(".")[0]
    if root in ("jax", "jaxlib"):
        try:
            return importlib.import_module("jax.numpy").from_dlpack
        except ImportError:
            return None
    module = sys.modules.get(root)
    return getattr(module, "from_dlpack", None) if module is not None else None


class HostResults:
    """Allocates a call's outputs as NumPy arrays and converts them back."""

    def __init__(self, logits):
        if isinstance(logits, np.ndarray):
            self.convert = None
            return
        device_type, _ = dlpack_device(logits)
        if device_type not in HOST_DEVICE_TYPES:
            raise Error("UNSUPPORTED",
                        f"{type(logits).__module__}.{type(logits).__name__} in device memory: "
                        "polysample makes device outputs only as PyTorch tensors; pass "
                        "torch.from_dlpack(x) (no copy), or a host array")
        self.convert = _from_dlpack_of(logits)

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, dtype=dtype)

    def result(self, array):
        return array if self.convert is None else self.convert(array)


def _host_array(value, name):
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "__dlpack__") and not hasattr(value, "__array__"):
        return np.from_dlpack(value)
    return np.asarray(value)


# The range of each integer element type an array argument becomes.
INTEGER_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1),
                  "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1)}


def host_per_row(value, kind, name):
    """An array argument as a contiguous NumPy array of the C element type.

    kind: "float32", or a key of INTEGER_RANGES. Integers must be integers
    (no silent truncation of 2.5 to 2) and must fit; float32 takes any real.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and kind != "float32":
        return _integer_sequence(value, kind, name)
    array = _host_array(value, name)
    if array.ndim == 0:
        # NumPy would make it one value silently (ascontiguousarray).
        raise Error("INVALID_ARGUMENT", f"{name} must be an array; got the scalar {value!r}")
    letter = array.dtype.kind
    if kind == "float32":
        if letter not in "fiu":
            raise Error("INVALID_ARGUMENT", f"{name} must hold real numbers; got {array.dtype}")
        return np.ascontiguousarray(array, dtype=np.float32)
    if letter not in "iu":
        raise Error("INVALID_ARGUMENT", f"{name} must hold integers; got {array.dtype}")
    low, high = INTEGER_RANGES[kind]
    if array.size and low == 0 and letter == "i" and array.min() < 0:
        raise Error("INVALID_PARAMETER", f"{name} has negative values; expected 0 to {high}")
    # Compared as Python integers: NumPy would compare uint64 with int64
    # bounds through float64.
    if array.size and (int(array.min()) < low or int(array.max()) > high):
        raise Error("INVALID_PARAMETER", f"{name} has values outside {low} to {high}")
    return np.ascontiguousarray(array, dtype=np.dtype(kind))


def _integer_sequence(values, kind, name):
    """A list of Python integers, checked one by one (NumPy would turn a
    list mixing 2^64 - 1 and small integers into float64)."""
    low, high = INTEGER_RANGES[kind]
    checked = []
    for value in values:
        try:
            value = operator.index(value)
        except TypeError:
            raise Error("INVALID_ARGUMENT", f"{name} must hold integers; got {value!r}") from None
        if not low <= value <= high:
            raise Error("INVALID_PARAMETER", f"{name} holds {value}, outside {low} to {high}")
        checked.append(value)
    return np.array(checked, dtype=np.dtype(kind))

"""Checks and conversions shared by the array API and the PyTorch op.

The library validates the sampling parameters itself (ranges, per-row host
arrays) before any work; this module only makes sure each Python value fits
the C type it becomes, so that nothing is silently truncated.
"""
import operator

from ._errors import ChoiceError, Error

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1

BACKEND_CODES = {"auto": 0, "cpu": 1, "cuda": 2, "hip": 3, "opencl": 4}
BACKEND_NAMES = {code: name for name, code in BACKEND_CODES.items()}

# The array arguments of a call, in the order the extension takes them
# (python/src/core.cpp, Arrays), with the element type each becomes.
# seed_tensor and offset_tensor hold one value: the scalar seed or offset,
# read when the call runs (on a GPU, when its kernels run: a captured CUDA
# graph reads their contents at every replay).
ARRAYS = (("temperature_per_row", "float32"), ("top_k_per_row", "int32"),
          ("top_p_per_row", "float32"), ("min_p_per_row", "float32"),
          ("seed_per_row", "uint64"), ("offset_per_row", "uint64"),
          ("subsequence_per_row", "uint32"), ("row_indices", "int64"),
          ("seed_tensor", "uint64"), ("offset_tensor", "uint64"))
ARRAY_NAMES = tuple(name for name, _ in ARRAYS)
ROW_INDICES = ARRAY_NAMES.index("row_indices")
# The arrays that matter to probs(): the filters' per-row values and the gather.
PROBS_ARRAYS = ("temperature_per_row", "top_k_per_row", "top_p_per_row", "min_p_per_row",
                "row_indices")


# psm_filter_order (include/polysample.h; docs/SAMPLING.md section 4,
# "Filter orders") by name: the names `polysample sample --filter-order`
# takes (cli/cli_util.c), and the FlashInfer ones with underscores, as
# Python identifiers and FlashInfer's own filter_apply_order spell them.
FILTER_ORDERS = {"polysample": 0, "vllm": 1, "sglang": 2, "llama.cpp": 3,
                 "flashinfer_top_k_first": 4, "flashinfer-top-k-first": 4,
                 "flashinfer_joint": 5, "flashinfer-joint": 5}


def filter_order_code(name, argument="filter_order"):
    """The psm_filter_order of a name, or a ChoiceError listing the names."""
    code = FILTER_ORDERS.get(name) if isinstance(name, str) else None
    if code is None:
        raise ChoiceError(f"{argument} must be one of {', '.join(FILTER_ORDERS)}; got {name!r}")
    return code


def arrays_of(values):
    """The ARRAYS tuple from a dict of the given ones (the others None)."""
    return tuple(values.get(name) for name in ARRAY_NAMES)


def _integer(value, name):
    try:
        return operator.index(value)
    except TypeError:
        raise Error("INVALID_ARGUMENT", f"{name} must be an integer; got {value!r}") from None


def _real(value, name):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise Error("INVALID_ARGUMENT", f"{name} must be a real number; got {value!r}") from None


def scalars(temperature, top_k, top_p, min_p, seed, offset, num_samples,
            filter_order="polysample"):
    """The scalar parameters as the C call takes them (the filter order as
    its psm_filter_order), or Error."""
    top_k = _integer(top_k, "top_k")
    if not INT32_MIN <= top_k <= INT32_MAX:
        raise Error("INVALID_PARAMETER", f"top_k is {top_k}; it must fit a 32-bit integer")
    num_samples = _integer(num_samples, "num_samples")
    if not 1 <= num_samples <= INT32_MAX:
        raise Error("INVALID_PARAMETER", f"num_samples is {num_samples}; expected 1 to 2^31 - 1")
    seed = _integer(seed, "seed")
    offset = _integer(offset, "offset")
    for name, value in (("seed", seed), ("offset", offset)):
        if not 0 <= value <= UINT64_MAX:
            raise Error("INVALID_PARAMETER", f"{name} is {value}; expected 0 to 2^64 - 1")
    return (_real(temperature, "temperature"), top_k, _real(top_p, "top_p"),
            _real(min_p, "min_p"), seed, offset, num_samples, filter_order_code(filter_order))


_PLAIN_REALS = (float, int)


def plain_scalars(temperature, top_k, top_p, min_p, seed, offset, num_samples,
                  filter_order="polysample"):
    """scalars()' result when every value is a plain float or int in its
    range and filter_order one of the names, else None: the caller then
    calls scalars(), which converts the other forms or raises. The same
    checks without scalars()' conversions, for the calls' fast paths."""
    if (type(top_k) is int and type(seed) is int and type(offset) is int
            and type(num_samples) is int and type(temperature) in _PLAIN_REALS
            and type(top_p) in _PLAIN_REALS and type(min_p) in _PLAIN_REALS
            and type(filter_order) is str and INT32_MIN <= top_k <= INT32_MAX
            and 0 <= seed <= UINT64_MAX and 0 <= offset <= UINT64_MAX
            and 1 <= num_samples <= INT32_MAX):
        order = FILTER_ORDERS.get(filter_order)
        if order is not None:
            return (float(temperature), top_k, float(top_p), float(min_p), seed, offset,
                    num_samples, order)
    return None


def plain_processing_off(allowed_mask, logit_bias, history, prompt, repetition_penalty,
                         frequency_penalty, presence_penalty):
    """Whether the processing arguments ask for nothing, told from plain
    values alone (a penalty that is not a plain number is left to the
    general path, which checks it)."""
    return (allowed_mask is None and logit_bias is None and history is None and prompt is None
            and type(repetition_penalty) in _PLAIN_REALS and repetition_penalty == 1.0
            and type(frequency_penalty) in _PLAIN_REALS and frequency_penalty == 0.0
            and type(presence_penalty) in _PLAIN_REALS and presence_penalty == 0.0)


def plain_top_off(top_logprobs, logprob_mode, return_ranks):
    """Whether the top-N arguments are their defaults (no top-N), told from
    plain values alone."""
    return (type(top_logprobs) is int and top_logprobs == 0 and return_ranks is False
            and type(logprob_mode) is str and logprob_mode == "processed")


def parse_backend(backend):
    """'cpu', 'cuda:1', ... -> (code, device index or None); None -> (None, None)."""
    if backend is None:
        return None, None
    if not isinstance(backend, str):
        raise Error("INVALID_ARGUMENT", f"backend must be a string such as 'cpu' or 'cuda:0'; "
                                        f"got {backend!r}")
    name, _, index = backend.partition(":")
    code = BACKEND_CODES.get(name.strip().lower())
    if code is None:
        raise Error("INVALID_ARGUMENT", f"unknown backend {backend!r}; expected auto, cpu, cuda, "
                                        f"hip or opencl, optionally with :N")
    if not index:
        return code, None
    if not index.isdigit():
        raise Error("INVALID_ARGUMENT", f"bad device index in backend {backend!r}")
    return code, int(index)

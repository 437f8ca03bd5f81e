"""polysample as PyTorch ops: torch.ops.polysample.sample, .sample_scalars
(sample with scalars only, which the wrappers call when nothing else is
given) and .probs.

    import polysample.torch as pst
    tokens = pst.sample(logits, temperature=0.8, top_p=0.9, seed=1234, offset=step)

The ops are registered with torch.library (a schema and a fake
implementation), so they trace under torch.compile and run inside CUDA
graphs. Their CPU and CUDA kernels are C++ (polysample._torch_ops, when
the package was built with torch importable, against the torch that runs)
or else the Python kernels below; KERNELS says which and KERNELS_REASON
why not C++. Both check alike and give the same outputs bit for bit.
Outputs are allocated by torch on the logits' device. On CUDA the
work runs on torch's current stream, with no synchronisation: a context of
the library bound to that stream is made at first use and kept per
(device, stream). CPU tensors run on the CPU backend.

Logit processing, filter orders and top-N logprobs take polysample.sample's
arguments; processing given as tensors on the logits' device reaches the
kernels without a copy (sample's docstring).

CUDA graphs: scalars (temperature, seed, offset, ...) are frozen into the
graph at capture, so a replay with them draws the same random numbers. To
draw anew at each replay, keep the positions on the device: offset_tensor
(one int64, the batch's offset) or offset_per_row (one per row, e.g. each
sequence's position), and seed_tensor or seed_per_row likewise; the kernels
read them when they run, so advancing them in place (inside the graph after
the sampling node, or between replays) makes the next replay draw anew.

Workspace: each call takes its workspace from torch's allocator (a uint8
tensor of the bytes the library's size query gives, on the logits' device
and torch's current stream), so the library allocates nothing:
inside a CUDA graph capture the workspace comes from the graph's memory
pool like any other tensor of the captured step, and outside from the
caching allocator. The library context bound to a (device, stream) is made
once and never grows.
"""
import importlib.util
import os
import re

import numpy as np
import torch

from . import _core
from . import SampleResult, _top_request
from ._arguments import (ARRAY_NAMES, ARRAYS, BACKEND_CODES, PROBS_ARRAYS, ROW_INDICES,
                         arrays_of, filter_order_code, parse_backend, plain_processing_off,
                         plain_scalars, plain_top_off, scalars)
from ._errors import Error
from ._frameworks import host_per_row

__all__ = ["sample", "probs"]

_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3,
          torch.int64: 4, torch.uint8: 7}
if hasattr(torch, "uint64"):
    _KINDS[torch.uint64] = 5
if hasattr(torch, "uint32"):
    _KINDS[torch.uint32] = 6

_IS_ROCM = getattr(torch.version, "hip", None) is not None
_DL_CPU, _DL_CUDA, _DL_ROCM = 1, 2, 10
_CUDA_STREAM_LEGACY = 1  # cudaStreamLegacy: torch's default stream, handle 0
_CAPTURE_MODE_RELAXED = 2
_UINT64_MASK = 2**64 - 1


def _raw(tensor):
    """The tuple the extension reads a tensor from (no DLPack capsule)."""
    device = tensor.device
    if device.type == "cpu":
        device_type, index = _DL_CPU, 0
    elif device.type == "cuda":
        device_type, index = (_DL_ROCM if _IS_ROCM else _DL_CUDA), device.index
    else:
        raise Error("UNSUPPORTED", f"tensors on {device.type} are not supported "
                                   "(cpu and cuda are)")
    return (tensor.data_ptr(), _KINDS.get(tensor.dtype, -1), device_type, index,
            tuple(tensor.shape), tensor.stride())


def _raw_or_none(tensor):
    return None if tensor is None else _raw(tensor)


try:
    _current_raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:
    def _current_raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream


_contexts = {}


def _context_for(device, backend):
    """The extension context that runs on torch's current stream for this
    device, made at first use. Calls bring their own workspace (_run), so
    the context never grows and a captured graph's use of it stays valid."""
    if device.type == "cpu":
        code = BACKEND_CODES["cpu"] if backend is None else backend
        key, index, stream, capturing = ("cpu", code), -1, 0, False
    else:
        code = BACKEND_CODES["hip" if _IS_ROCM else "cuda"]
        if backend is not None and backend != code:
            raise Error("WRONG_BACKEND", f"{device} tensors run on the "
                                         f"{'hip' if _IS_ROCM else 'cuda'} backend")
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = _current_raw_stream(index)
        if stream == 0:
            if _IS_ROCM:
                raise Error("UNSUPPORTED", "ROCm: run under a torch.cuda.Stream; the library "
                                           "cannot name HIP's null stream")
            stream = _CUDA_STREAM_LEGACY
        key = (index, stream)
        capturing = torch.cuda.is_current_stream_capturing()
    context = _contexts.get(key)
    if context is not None:
        return context
    # Creating a context may allocate device memory, which CUDA refuses
    # during a capture in the default (global) mode: relax it for this thread.
    previous_mode = _core.exchange_capture_mode(_CAPTURE_MODE_RELAXED) if capturing else None
    try:
        context = _core.Context(code, index, False, stream, 0, None)
    finally:
        if previous_mode is not None and previous_mode >= 0:
            _core.exchange_capture_mode(previous_mode)
    _contexts[key] = context
    return context


# Per array argument (polysample._arguments.ARRAYS): the tensor dtypes taken
# as they are, the first being the one others are converted to. Unsigned
# values travel in the signed type of their width, read as the same bits.
_UNSIGNED64 = (torch.int64,) + ((torch.uint64,) if hasattr(torch, "uint64") else ())
_UNSIGNED32 = (torch.int32,) + ((torch.uint32,) if hasattr(torch, "uint32") else ())
_ARRAY_DTYPES = ((torch.float32,), (torch.int32,), (torch.float32,), (torch.float32,),
                 _UNSIGNED64, _UNSIGNED64, _UNSIGNED32, (torch.int64,), _UNSIGNED64,
                 _UNSIGNED64)
_SIGNED_OF = {"uint64": np.int64, "uint32": np.int32}


def _array_tensor(value, dtypes, name, kind, device):
    """An array argument as a tensor on the logits' device. Sequences and
    tensors of another dtype are converted (a copy; for CUDA graphs pass
    tensors of the right dtype and device, so that the graph reads the
    tensor you update)."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        array = host_per_row(value, kind, name)
        signed = _SIGNED_OF.get(kind)
        value = torch.from_numpy(array.view(signed) if signed is not None else array)
    if value.dtype not in dtypes:
        if value.is_floating_point() and not dtypes[0].is_floating_point:
            raise Error("INVALID_ARGUMENT", f"{name} must hold integers")
        value = value.to(dtypes[0])
    if value.device != device:
        value = value.to(device)
    return value


def _prepare_arrays(arrays, device):
    return tuple(_array_tensor(value, dtypes, name, kind, device)
                 for value, dtypes, (name, kind) in zip(arrays, _ARRAY_DTYPES, ARRAYS))


def _check_logits(logits):
    if logits.dim() not in (1, 2):
        raise Error("INVALID_ARGUMENT", f"logits must be 1-D or 2-D; got {logits.dim()}-D")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Error("INVALID_ARGUMENT", f"logits must be float32, float16 or bfloat16; got "
                                        f"{logits.dtype}")
    rows = logits.shape[0] if logits.dim() == 2 else 1
    return rows, logits.shape[-1]


def _output_rows(logits, arrays):
    indices = arrays[ROW_INDICES]
    if indices is None:
        return tuple(logits.shape[:-1])
    if indices.dim() != 1:
        raise Error("INVALID_ARGUMENT", f"row_indices must be 1-D; got {indices.dim()}-D")
    return (indices.shape[0],)


def _outputs(mode, logits, arrays, samples, return_logprobs):
    rows = _output_rows(logits, arrays)
    if mode == 1:
        return torch.empty(rows + (logits.shape[-1],), dtype=torch.float32,
                           device=logits.device), None
    tokens = torch.empty(rows + (samples,), dtype=torch.int32, device=logits.device)
    logprobs = torch.empty(rows + (samples,) if return_logprobs else (0,),
                           dtype=torch.float32, device=logits.device)
    return tokens, logprobs


def _torch_workspace(device, kept):
    """The allocator the extension calls with the bytes a call needs: a
    uint8 tensor from torch's allocator on torch's current stream, kept
    alive (in `kept`) until the call has been queued; torch then reuses the
    memory only for later work on that stream."""
    def allocate(size):
        workspace = torch.empty(size, dtype=torch.uint8, device=device)
        kept.append(workspace)
        return _raw(workspace)
    return allocate


def _processing_tensors(processing, device, kept):
    """The processing tuple (polysample._processing.processing_tuple's
    order; its arrays host NumPy arrays or tensors already on the logits'
    device, as the op passes them) as raw tensors on the logits' device,
    the copies kept alive in `kept` until the call has been queued. The
    uint32 mask travels as int32 (the same bits)."""
    if processing is None:
        return None
    raw = []
    for array in processing[:-1]:
        if array is None:
            raw.append(None)
            continue
        if not isinstance(array, torch.Tensor):
            if array.dtype == np.uint32:
                array = array.view(np.int32)
            array = torch.from_numpy(array).to(device)
            kept.append(array)
        raw.append(_raw(array))
    return tuple(raw) + (processing[-1],)


def _top_outputs(logits, arrays, samples, top):
    """The top-N outputs on the logits' device for top (polysample's
    _top_request: N, mode, return_ranks), or None."""
    if top is None:
        return None
    rows = _output_rows(logits, arrays)
    count, _, return_ranks = top
    return (torch.empty(rows + (count,), dtype=torch.int32, device=logits.device),
            torch.empty(rows + (count,), dtype=torch.float32, device=logits.device),
            torch.empty(rows + (samples,), dtype=torch.int32, device=logits.device)
            if return_ranks else None)


def _top_argument(top, outputs):
    """The extension's top tuple (count, mode, top_tokens, top_logprobs,
    ranks) as raw tensors, or None."""
    if top is None:
        return None
    return top[:2] + tuple(map(_raw_or_none, outputs))


def _run(mode, context, logits, values, arrays, return_logprobs, workspace, processing=None,
         top=None):
    """One call; workspace: a uint8 tensor, None (the context's own) or
    "torch" (torch's allocator, sized by the library's query). With top (N,
    mode, return_ranks) the drawn tokens' logprobs are always made, and the
    result has the top-N outputs as a third entry."""
    return_logprobs = return_logprobs or top is not None
    out, logprobs = _outputs(mode, logits, arrays, values[6], return_logprobs)
    outputs = _top_outputs(logits, arrays, values[6], top)
    kept = []
    if isinstance(workspace, str):
        workspace = _torch_workspace(logits.device, kept)
    elif workspace is not None:
        workspace = _raw(workspace)
    context.run(mode, _raw(logits), values, tuple(map(_raw_or_none, arrays)), _raw(out),
                _raw(logprobs) if mode == 0 and return_logprobs else None, workspace,
                _processing_tensors(processing, logits.device, kept),
                _top_argument(top, outputs))
    if top is not None:
        return out, logprobs, outputs
    return out, logprobs


def _workspace_size(context, mode, logits, values, arrays, return_logprobs, processing=None,
                    top=None):
    """Context.sample_workspace_size / probs_workspace_size on tensors."""
    _check_logits(logits)
    arrays = _prepare_arrays(arrays, logits.device)
    out, logprobs = _outputs(mode, logits, arrays, values[6], return_logprobs)
    kept = []
    return context.workspace_size(mode, _raw(logits), values, tuple(map(_raw_or_none, arrays)),
                                  _raw(out), _raw(logprobs) if mode == 0 and return_logprobs
                                  else None, _processing_tensors(processing, logits.device, kept),
                                  _top_argument(top, _top_outputs(logits, arrays, values[6],
                                                                  top)))


def _result(mode, results, return_logprobs):
    """What polysample.sample / probs return from _run's results."""
    if mode == 1:
        return results[0]
    if len(results) == 3:
        return SampleResult(results[0], results[1], *results[2])
    return results if return_logprobs else results[0]


def _eager(mode, logits, backend, values, arrays, return_logprobs, workspace, processing=None,
           top=None):
    """polysample.sample / probs on a tensor: the op's work without the
    dispatcher (which only matters when tracing)."""
    code, index = parse_backend(backend)
    if index is not None and logits.device.type == "cuda" and index != logits.device.index:
        raise Error("WRONG_BACKEND", f"backend {backend!r} names device {index}; the logits "
                                     f"are on {logits.device}")
    _check_logits(logits)
    arrays = _prepare_arrays(arrays, logits.device)
    context = _context_for(logits.device, code)
    return _result(mode, _run(mode, context, logits, values, arrays, return_logprobs,
                              "torch" if workspace is None else workspace, processing, top),
                   return_logprobs)


def _run_on_context(context, mode, logits, values, arrays, return_logprobs, workspace,
                    processing=None, top=None):
    """polysample.Context.sample / probs on a tensor: the Context's own
    stream, so it waits for torch's stream before and for itself after.
    Without a workspace the Context uses its own."""
    _check_logits(logits)
    arrays = _prepare_arrays(arrays, logits.device)
    if logits.device.type == "cuda":
        torch.cuda.current_stream(logits.device).synchronize()
    results = _run(mode, context._context, logits, values, arrays, return_logprobs, workspace,
                   processing, top)
    if logits.device.type == "cuda" and context._own_stream:
        context.synchronize()
    return _result(mode, results, return_logprobs)


# The ops. Seeds and offsets are unsigned 64-bit in the C API and signed in
# a schema's `int`: the wrappers pass their two's-complement bits. Logit
# processing enters as tensors on the logits' device (the C struct
# psm_logit_processing's arrays, polysample._processing.processing_tuple's
# order) and three penalty scalars; top-N as N (0: none), the mode's code
# and return_ranks. A schema cannot return None: outputs that were not
# asked for are empty tensors, and the wrappers return None for them.
_PROCESSING_SCHEMA = (
    "Tensor? allowed_mask, Tensor? bias_offsets, Tensor? bias_tokens, Tensor? bias_values, "
    "Tensor? history_offsets, Tensor? history_tokens, Tensor? prompt_offsets, "
    "Tensor? prompt_tokens, Tensor? repetition_penalty_per_row, "
    "Tensor? frequency_penalty_per_row, Tensor? presence_penalty_per_row, "
    "float repetition_penalty, float frequency_penalty, float presence_penalty")
_library = torch.library.Library("polysample", "DEF")
_library.define(
    "sample(Tensor logits, float temperature, int top_k, float top_p, float min_p, int seed, "
    "int offset, int num_samples, Tensor? temperature_per_row, Tensor? top_k_per_row, "
    "Tensor? top_p_per_row, Tensor? min_p_per_row, Tensor? seed_per_row, "
    "Tensor? offset_per_row, Tensor? subsequence_per_row, Tensor? row_indices, "
    "Tensor? seed_tensor, Tensor? offset_tensor, bool return_logprobs, int filter_order, "
    + _PROCESSING_SCHEMA + ", int top_logprobs, int logprob_mode, bool return_ranks) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor)")
# sample with its scalars alone, the call polysample.torch.sample and
# polysample.sample make when no array, processing or top-N is given: fewer
# arguments for the dispatcher to convert, two outputs instead of five.
_library.define(
    "sample_scalars(Tensor logits, float temperature, int top_k, float top_p, float min_p, "
    "int seed, int offset, int num_samples, bool return_logprobs, int filter_order) -> "
    "(Tensor, Tensor)")
_library.define(
    "probs(Tensor logits, float temperature, int top_k, float top_p, float min_p, "
    "Tensor? temperature_per_row, Tensor? top_k_per_row, Tensor? top_p_per_row, "
    "Tensor? min_p_per_row, Tensor? row_indices, int filter_order, "
    + _PROCESSING_SCHEMA + ") -> Tensor")

_PROBS_INDICES = tuple(ARRAY_NAMES.index(name) for name in PROBS_ARRAYS)
_PROCESSING_OFF = (1.0, 0.0, 0.0)
_NO_PROCESSING = (None,) * 11 + _PROCESSING_OFF


def _probs_arrays(temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,
                  row_indices):
    return arrays_of(dict(temperature_per_row=temperature_per_row,
                          top_k_per_row=top_k_per_row, top_p_per_row=top_p_per_row,
                          min_p_per_row=min_p_per_row, row_indices=row_indices))


def _op_processing(processing):
    """The extension's processing tuple from the op's 14 processing
    arguments, or None when they ask for nothing."""
    arrays, penalties = tuple(processing[:11]), tuple(float(value) for value in processing[11:])
    if all(array is None for array in arrays) and penalties == _PROCESSING_OFF:
        return None
    return arrays + (penalties,)


def _op_top(top_logprobs, logprob_mode, return_ranks):
    return (int(top_logprobs), int(logprob_mode), bool(return_ranks)) if top_logprobs else None


def _sample_kernel(logits, temperature, top_k, top_p, min_p, seed, offset, num_samples,
                   temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,
                   seed_per_row, offset_per_row, subsequence_per_row, row_indices, seed_tensor,
                   offset_tensor, return_logprobs, filter_order, *rest):
    processing, (top_logprobs, logprob_mode, return_ranks) = rest[:14], rest[14:]
    values = scalars(temperature, top_k, top_p, min_p, seed & _UINT64_MASK,
                     offset & _UINT64_MASK, num_samples)[:7] + (int(filter_order),)
    _check_logits(logits)
    arrays = (temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row, seed_per_row,
              offset_per_row, subsequence_per_row, row_indices, seed_tensor, offset_tensor)
    context = _context_for(logits.device, None)
    top = _op_top(top_logprobs, logprob_mode, return_ranks)
    results = _run(0, context, logits, values, arrays, return_logprobs, "torch",
                   _op_processing(processing), top)
    tokens, logprobs = results[0], results[1]
    if top is None:
        return tokens, logprobs, _empty(logits, torch.int32), _empty(logits, torch.float32), \
            _empty(logits, torch.int32)
    top_tokens, top_values, ranks = results[2]
    return tokens, logprobs, top_tokens, top_values, \
        ranks if ranks is not None else _empty(logits, torch.int32)


def _sample_scalars_kernel(logits, temperature, top_k, top_p, min_p, seed, offset,
                           num_samples, return_logprobs, filter_order):
    return _sample_kernel(logits, temperature, top_k, top_p, min_p, seed, offset, num_samples,
                          *(None,) * 10, return_logprobs, filter_order, *_NO_PROCESSING,
                          0, 0, False)[:2]


def _probs_kernel(logits, temperature, top_k, top_p, min_p, temperature_per_row,
                  top_k_per_row, top_p_per_row, min_p_per_row, row_indices, filter_order,
                  *processing):
    values = scalars(temperature, top_k, top_p, min_p, 0, 0, 1)[:7] + (int(filter_order),)
    _check_logits(logits)
    arrays = _probs_arrays(temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,
                           row_indices)
    context = _context_for(logits.device, None)
    return _run(1, context, logits, values, arrays, False, "torch",
                _op_processing(processing))[0]


def _cpp_kernels():
    """Registers polysample._torch_ops' C++ kernels as the ops' CPU and CUDA
    kernels; returns None, or why they are not used (the Python kernels
    above then are)."""
    if os.environ.get("POLYSAMPLE_TORCH_OPS", "1") == "0":
        return "POLYSAMPLE_TORCH_OPS=0 asks for the Python kernels"
    if importlib.util.find_spec(__package__ + "._torch_ops") is None:
        return ("polysample was built without them (torch was not importable where it was "
                "built; python/README.md says how to build them)")
    try:
        from . import _torch_ops
    except ImportError as error:
        return f"polysample._torch_ops did not load: {error}"
    if _torch_ops.TORCH_VERSION != torch.__version__:
        return (f"polysample._torch_ops was built against torch {_torch_ops.TORCH_VERSION}; "
                f"this is torch {torch.__version__}")
    arguments = tuple(len(getattr(torch.ops.polysample, name).default._schema.arguments)
                      for name in ("sample", "sample_scalars", "probs"))
    expected = (_torch_ops.SAMPLE_ARGUMENTS, _torch_ops.SAMPLE_SCALARS_ARGUMENTS,
                _torch_ops.PROBS_ARGUMENTS)
    if arguments != expected:
        return (f"polysample._torch_ops reads {expected} arguments; the schemas (sample, "
                f"sample_scalars, probs) have {arguments}")
    _torch_ops.register_kernels(_IS_ROCM)
    return None


KERNELS_REASON = _cpp_kernels()
"""None when the ops run polysample._torch_ops' C++ kernels, else why they
run the Python kernels (_sample_kernel, _probs_kernel)."""
KERNELS = "python" if KERNELS_REASON else "c++"
if KERNELS == "python":
    for _key in ("CPU", "CUDA"):
        _library.impl("sample", _sample_kernel, _key)
        _library.impl("sample_scalars", _sample_scalars_kernel, _key)
        _library.impl("probs", _probs_kernel, _key)


def _empty(logits, dtype):
    return logits.new_empty((0,), dtype=dtype)


def _fake_rows(logits, row_indices):
    return (row_indices.shape[0],) if row_indices is not None else tuple(logits.shape[:-1])


@torch.library.register_fake("polysample::sample")
def _sample_fake(logits, temperature, top_k, top_p, min_p, seed, offset, num_samples,
                 temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,
                 seed_per_row, offset_per_row, subsequence_per_row, row_indices, seed_tensor,
                 offset_tensor, return_logprobs, filter_order, *rest):
    top_logprobs, _, return_ranks = rest[14:]
    rows = _fake_rows(logits, row_indices)
    shape = rows + (num_samples,)
    tokens = logits.new_empty(shape, dtype=torch.int32)
    logprobs = logits.new_empty(shape if return_logprobs or top_logprobs else (0,),
                                dtype=torch.float32)
    top_shape = rows + (top_logprobs,) if top_logprobs else (0,)
    return (tokens, logprobs, logits.new_empty(top_shape, dtype=torch.int32),
            logits.new_empty(top_shape, dtype=torch.float32),
            logits.new_empty(shape if top_logprobs and return_ranks else (0,), dtype=torch.int32))


@torch.library.register_fake("polysample::sample_scalars")
def _sample_scalars_fake(logits, temperature, top_k, top_p, min_p, seed, offset, num_samples,
                         return_logprobs, filter_order):
    shape = tuple(logits.shape[:-1]) + (num_samples,)
    return (logits.new_empty(shape, dtype=torch.int32),
            logits.new_empty(shape if return_logprobs else (0,), dtype=torch.float32))


@torch.library.register_fake("polysample::probs")
def _probs_fake(logits, temperature, top_k, top_p, min_p, temperature_per_row, top_k_per_row,
                top_p_per_row, min_p_per_row, row_indices, filter_order, *processing):
    return logits.new_empty(_fake_rows(logits, row_indices) + (logits.shape[-1],),
                            dtype=torch.float32)


def _signed64(value, name):
    value = int(value)
    if not 0 <= value <= _UINT64_MASK:
        raise Error("INVALID_PARAMETER", f"{name} is {value}; expected 0 to 2^64 - 1")
    return value - 2**64 if value >= 2**63 else value


# ---- logit processing as the ops' tensors ---------------------------------
# Tensors already of the right dtype on the logits' device pass untouched
# (what a CUDA graph needs: the graph then reads the tensors the caller
# updates); other forms (dicts, lists, NumPy, tensors of another dtype or
# device) go through polysample._processing's host checks, which also
# check each value's range, and are copied to the device.
_CSR_PARTS = {"logit_bias": (1, (torch.int64, torch.int32, torch.float32)),
              "history": (4, (torch.int64, torch.int32)),
              "prompt": (6, (torch.int64, torch.int32))}
_PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")


def _as_given(value, dtype, device):
    """Whether a processing argument is a 1-D tensor of `dtype` on the
    logits' device, which the op takes as it is."""
    return (isinstance(value, torch.Tensor) and value.device == device and value.dtype == dtype
            and value.dim() == 1)


def _device_mask(mask, rows, vocab, one_row):
    """An allowed-token mask tensor as the library's int32 words on its own
    device: bool (rows, vocab) packed with tensor operations (traceable,
    no copy to the host), int32 or uint32 (rows, words) as it is."""
    from ._processing import check_mask_shape
    if one_row and mask.dim() == 1:
        mask = mask.unsqueeze(0)
    check_mask_shape(tuple(mask.shape), mask.dtype == torch.bool, rows, vocab)
    if mask.dtype == torch.bool:
        words = -(-vocab // 32)
        bits = torch.nn.functional.pad(mask.to(torch.int64), (0, words * 32 - vocab))
        weights = torch.bitwise_left_shift(
            torch.ones(32, dtype=torch.int64, device=mask.device),
            torch.arange(32, dtype=torch.int64, device=mask.device))
        packed = (bits.view(rows, words, 32) * weights).sum(-1)
        # The words' bits as int32: values from 2^31 up wrap to negative.
        return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    if mask.dtype == torch.int32 or (hasattr(torch, "uint32") and mask.dtype == torch.uint32):
        return mask.contiguous().view(torch.int32)
    raise Error("INVALID_ARGUMENT", f"allowed_mask must be bool (rows, vocab) or int32/uint32 "
                                    f"(rows, words); got {mask.dtype}")


def _device_processing(logits, row_indices, arguments):
    """The ops' 14 processing arguments (11 tensors or None, then the three
    penalty scalars) from polysample.sample's processing arguments."""
    from ._processing import NAMES, RowLists, processing_tuple
    # Whether anything is asked, without NumPy on tensors (torch.compile
    # traces this): a tensor penalty asks, as any list or mask does.
    if all(arguments[name] is None for name in NAMES[:4]) and all(
            isinstance(arguments[name], (int, float)) and arguments[name] == off
            for name, off in zip(_PENALTIES, _PROCESSING_OFF)):
        return _NO_PROCESSING
    device = logits.device
    rows, _ = _check_logits(logits)
    one_row = row_indices is None and logits.dim() == 1
    if row_indices is not None:
        rows = len(row_indices)
    vocab = logits.shape[-1]
    tensors, penalties, host = [None] * 11, list(_PROCESSING_OFF), {}
    mask = arguments.get("allowed_mask")
    if isinstance(mask, torch.Tensor) and mask.device == device:
        tensors[0] = _device_mask(mask, rows, vocab, one_row)
    elif mask is not None:
        host["allowed_mask"] = mask
    for name, (first, dtypes) in _CSR_PARTS.items():
        lists = arguments.get(name)
        if isinstance(lists, RowLists) and all(
                _as_given(part, dtype, device) for part, dtype in zip(lists, dtypes)):
            # Lengths are checked by the extension, host offsets too.
            tensors[first:first + len(dtypes)] = lists[:len(dtypes)]
        elif lists is not None:
            host[name] = lists
    for index, name in enumerate(_PENALTIES):
        value = arguments.get(name, _PROCESSING_OFF[index])
        if _as_given(value, torch.float32, device):
            tensors[8 + index] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            penalties[index] = float(value)
        else:
            host[name] = value
    converted = processing_tuple(host, rows, vocab, one_row) if host else None
    if converted is not None:
        for index, array in enumerate(converted[:-1]):
            if array is not None:
                tensors[index] = torch.from_numpy(
                    array.view(np.int32) if array.dtype == np.uint32 else array).to(device)
        penalties = [converted[-1][index] if name in host else penalties[index]
                     for index, name in enumerate(_PENALTIES)]
    return tuple(tensors) + tuple(penalties)


# ---- the wrappers ------------------------------------------------------------
_SAMPLE = torch.ops.polysample.sample.default
_PROBS = torch.ops.polysample.probs.default
# The overloads' own callables: an eager call without OpOverload.__call__'s
# Python frame (torch.compile traces the OpOverloads instead).
_SAMPLE_CALL = getattr(_SAMPLE, "_op", _SAMPLE)
_SAMPLE_SCALARS_CALL = getattr(torch.ops.polysample.sample_scalars.default, "_op",
                               torch.ops.polysample.sample_scalars.default)
_PROBS_CALL = getattr(_PROBS, "_op", _PROBS)
_NO_ARRAYS = (None,) * 10
_NO_TOP = (0, 0, False)
_INT64_MAX = 2**63 - 1
_CPP_FAILURE = re.compile(r"polysample ([A-Z_]+): (.*)", re.S)


def _call(op, arguments):
    """op(*arguments), a C++ kernel's failure (a RuntimeError saying
    "polysample STATUS: message") raised as polysample.Error."""
    try:
        return op(*arguments)
    except RuntimeError as error:
        match = _CPP_FAILURE.match(str(error))
        if match is None:
            raise
        raise Error(match.group(1), match.group(2)) from None


def _plain_sample(logits, values, return_logprobs):
    """The sample op with scalars only (polysample._arguments.plain_scalars'
    values): no arrays, processing or top-N; nothing left to convert. With
    the C++ kernels, sample_scalars; with the Python ones, sample (whose
    kernel sample_scalars' would call anyway)."""
    seed, offset = values[4], values[5]
    seed = seed - 2**64 if seed > _INT64_MAX else seed
    offset = offset - 2**64 if offset > _INT64_MAX else offset
    return_logprobs = bool(return_logprobs)
    if KERNELS == "c++":
        tokens, logprobs = _call(_SAMPLE_SCALARS_CALL, (
            logits, values[0], values[1], values[2], values[3], seed, offset, values[6],
            return_logprobs, values[7]))
    else:
        tokens, logprobs, _, _, _ = _call(_SAMPLE_CALL, (
            logits, values[0], values[1], values[2], values[3], seed, offset, values[6]) +
            _NO_ARRAYS + (return_logprobs, values[7]) + _NO_PROCESSING + _NO_TOP)
    return (tokens, logprobs) if return_logprobs else tokens


def _plain_probs(logits, values):
    """The probs op with scalars only, as _plain_sample."""
    return _call(_PROBS_CALL, (logits, values[0], values[1], values[2], values[3], None, None,
                               None, None, None, values[7]) + _NO_PROCESSING)


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0,
           num_samples=1, temperature_per_row=None, top_k_per_row=None, top_p_per_row=None,
           min_p_per_row=None, seed_per_row=None, offset_per_row=None, subsequence_per_row=None,
           row_indices=None, seed_tensor=None, offset_tensor=None, return_logprobs=False,
           filter_order="polysample", allowed_mask=None, logit_bias=None, history=None,
           prompt=None, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
           top_logprobs=0, logprob_mode="processed", return_ranks=False):
    """torch.ops.polysample.sample with polysample.sample's arguments.

    Array arguments are tensors on the logits' device: float32 for
    temperature, top-p, min-p; int32 for top-k; int64 for seeds and offsets
    (read as unsigned), int32 for subsequences (read as unsigned), int64 for
    row_indices; seed_tensor and offset_tensor hold one int64 each, read
    when the kernels run. Other inputs are converted first (a copy, which a
    CUDA graph would not see updated). The workspace comes from torch's
    allocator (the module's docstring).

    Logit processing takes polysample.sample's forms; for CUDA graphs pass
    tensors on the logits' device, which the graph then reads as they are:
    allowed_mask as bool (rows, vocab) (packed on the device each call) or
    int32/uint32 words (rows, words); logit_bias, history and prompt as
    polysample.RowLists of 1-D tensors (offsets int64, tokens int32, values
    float32); penalties as numbers or float32 tensors of one value per row.
    The device lists are read as far as their offsets say: keep each
    offsets' last value within its tokens (the host forms are checked).

    Returns tokens (int32, of shape logits.shape[:-1] + (num_samples,), or
    (len(row_indices), num_samples)), or (tokens, logprobs) with
    return_logprobs, or with top_logprobs=N a polysample.SampleResult
    (tokens, logprobs, top_tokens, top_logprobs, ranks or None)."""
    if (temperature_per_row is None and top_k_per_row is None and top_p_per_row is None
            and min_p_per_row is None and seed_per_row is None and offset_per_row is None
            and subsequence_per_row is None and row_indices is None and seed_tensor is None
            and offset_tensor is None
            and plain_processing_off(allowed_mask, logit_bias, history, prompt,
                                     repetition_penalty, frequency_penalty, presence_penalty)
            and plain_top_off(top_logprobs, logprob_mode, return_ranks)
            and not torch.compiler.is_compiling()):
        values = plain_scalars(temperature, top_k, top_p, min_p, seed, offset, num_samples,
                               filter_order)
        if values is not None:
            return _plain_sample(logits, values, return_logprobs)
    arrays = (temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row, seed_per_row,
              offset_per_row, subsequence_per_row, row_indices, seed_tensor, offset_tensor)
    order = filter_order_code(filter_order)
    top = _top_request(top_logprobs, logprob_mode, return_ranks)
    processing = dict(allowed_mask=allowed_mask, logit_bias=logit_bias, history=history,
                      prompt=prompt, repetition_penalty=repetition_penalty,
                      frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        scalars(temperature, top_k, top_p, min_p, seed, offset, num_samples)
        arrays = _prepare_arrays(arrays, logits.device)
    processing = _device_processing(logits, arrays[ROW_INDICES], processing)
    count, mode, ranks_on = top if top is not None else _NO_TOP
    arguments = (logits, float(temperature), int(top_k), float(top_p), float(min_p),
                 _signed64(seed, "seed"), _signed64(offset, "offset"), int(num_samples)) + \
        tuple(arrays) + (bool(return_logprobs), order) + tuple(processing) + \
        (count, mode, ranks_on)
    tokens, logprobs, top_tokens, top_values, ranks = \
        _SAMPLE(*arguments) if compiling else _call(_SAMPLE_CALL, arguments)
    if top is not None:
        return SampleResult(tokens, logprobs, top_tokens, top_values,
                            ranks if ranks_on else None)
    return (tokens, logprobs) if return_logprobs else tokens


def probs(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, temperature_per_row=None,
          top_k_per_row=None, top_p_per_row=None, min_p_per_row=None, row_indices=None,
          filter_order="polysample", allowed_mask=None, logit_bias=None, history=None,
          prompt=None, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0):
    """torch.ops.polysample.probs: the distribution sample() draws from
    (with row_indices, one row per entry); processing as for sample()."""
    compiling = torch.compiler.is_compiling()
    if (temperature_per_row is None and top_k_per_row is None and top_p_per_row is None
            and min_p_per_row is None and row_indices is None and not compiling
            and plain_processing_off(allowed_mask, logit_bias, history, prompt,
                                     repetition_penalty, frequency_penalty, presence_penalty)):
        values = plain_scalars(temperature, top_k, top_p, min_p, 0, 0, 1, filter_order)
        if values is not None:
            return _plain_probs(logits, values)
    arrays = _probs_arrays(temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,
                           row_indices)
    order = filter_order_code(filter_order)
    processing = dict(allowed_mask=allowed_mask, logit_bias=logit_bias, history=history,
                      prompt=prompt, repetition_penalty=repetition_penalty,
                      frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
    if not compiling:
        scalars(temperature, top_k, top_p, min_p, 0, 0, 1)
        arrays = _prepare_arrays(arrays, logits.device)
    processing = _device_processing(logits, arrays[ROW_INDICES], processing)
    arguments = (logits, float(temperature), int(top_k), float(top_p), float(min_p)) + \
        tuple(arrays[index] for index in _PROBS_INDICES) + (order,) + tuple(processing)
    return _PROBS(*arguments) if compiling else _call(_PROBS_CALL, arguments)

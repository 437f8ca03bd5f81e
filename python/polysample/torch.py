"""polysample as PyTorch ops: torch.ops.polysample.sample and .probs.

    import polysample.torch as pst
    tokens = pst.sample(logits, temperature=0.8, top_p=0.9, seed=1234, offset=step)

The ops are registered with torch.library (a schema and a fake
implementation), so they trace under torch.compile and run inside CUDA
graphs. Outputs are allocated by torch on the logits' device. On CUDA the
work runs on torch's current stream, with no synchronisation: a context of
the library bound to that stream is made at first use and kept per
(device, stream). CPU tensors run on the CPU backend.

CUDA graphs: scalars (temperature, seed, offset, ...) are frozen into the
graph at capture, so a replay draws the same random numbers. To draw anew
at each replay, pass seed_per_row as a CUDA int64 tensor and update it in
place between replays (e.g. request seed + step); with per-row seeds a
row's draws depend on its seed alone, not its position in the batch.

Workspace: the library keeps its own device workspace per context (the C
API has no hook for an external allocator yet), reserved outside the timed
path: a context grows when it first sees a larger shape. A context whose
workspace a captured graph may use is never grown or freed: a larger shape
gets a fresh context and the old one is kept for the graphs (its memory is
held until the process exits).
"""
import numpy as np
import torch

from . import _core
from ._arguments import BACKEND_CODES, parse_backend, scalars
from ._errors import Error
from ._frameworks import host_per_row

__all__ = ["sample", "probs"]

_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3,
          torch.int64: 4}
if hasattr(torch, "uint64"):
    _KINDS[torch.uint64] = 5

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


class _Entry:
    """A cached context and the workspace it has reserved."""
    __slots__ = ("context", "rows", "vocab", "samples", "captured")

    def __init__(self, context, rows, vocab, samples, captured):
        self.context = context
        self.rows, self.vocab, self.samples = rows, vocab, samples
        self.captured = captured


_entries = {}
_kept_for_graphs = []


def _context_for(device, backend, rows, vocab, samples):
    """The extension context to run a call of this size on, on torch's
    current stream, with its workspace reserved (see the module docstring)."""
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
    entry = _entries.get(key)
    if entry is not None and rows <= entry.rows and vocab <= entry.vocab \
            and samples <= entry.samples:
        if capturing:
            entry.captured = True
        return entry.context
    if entry is not None:
        rows, vocab = max(rows, entry.rows), max(vocab, entry.vocab)
        samples = max(samples, entry.samples)
        if not (entry.captured or capturing):
            entry.context.reserve(rows, vocab, samples)
            entry.rows, entry.vocab, entry.samples = rows, vocab, samples
            return entry.context
        _kept_for_graphs.append(entry.context)
    # Creating a context allocates device memory, which CUDA refuses during
    # a capture in the default (global) mode: relax it for this thread.
    previous_mode = _core.exchange_capture_mode(_CAPTURE_MODE_RELAXED) if capturing else None
    try:
        context = _core.Context(code, index, False, stream, 0, None)
        context.reserve(rows, vocab, samples)
    finally:
        if previous_mode is not None and previous_mode >= 0:
            _core.exchange_capture_mode(previous_mode)
    _entries[key] = _Entry(context, rows, vocab, samples, capturing)
    return context


_PER_ROW_DTYPES = (torch.float32, torch.int32, torch.float32, torch.float32, None)
_PER_ROW_NAMES = ("temperature_per_row", "top_k_per_row", "top_p_per_row", "min_p_per_row",
                  "seed_per_row")


def _per_row_tensor(value, dtype, name, device):
    """A per-row parameter as a tensor on the logits' device. Sequences and
    tensors of another dtype are converted (a copy; for CUDA graphs pass
    tensors of the right dtype and device)."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        kind = "uint64" if dtype is None else str(dtype).replace("torch.", "")
        array = host_per_row(value, kind, name)
        # Seeds travel as int64 carrying the unsigned bits.
        value = torch.from_numpy(array.view(np.int64) if kind == "uint64" else array)
    if name == "seed_per_row":
        if value.dtype not in (torch.int64, getattr(torch, "uint64", torch.int64)):
            if value.is_floating_point():
                raise Error("INVALID_ARGUMENT", "seed_per_row must hold integers")
            value = value.to(torch.int64)
    elif value.dtype != dtype:
        if dtype == torch.int32 and value.is_floating_point():
            raise Error("INVALID_ARGUMENT", f"{name} must hold integers")
        value = value.to(dtype)
    if value.device != device:
        value = value.to(device)
    return value


def _prepare_per_row(per_row, device):
    return tuple(_per_row_tensor(value, dtype, name, device)
                 for value, dtype, name in zip(per_row, _PER_ROW_DTYPES, _PER_ROW_NAMES))


def _check_logits(logits):
    if logits.dim() not in (1, 2):
        raise Error("INVALID_ARGUMENT", f"logits must be 1-D or 2-D; got {logits.dim()}-D")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Error("INVALID_ARGUMENT", f"logits must be float32, float16 or bfloat16; got "
                                        f"{logits.dtype}")
    rows = logits.shape[0] if logits.dim() == 2 else 1
    return rows, logits.shape[-1]


def _run(mode, context, logits, values, per_row, return_logprobs):
    temperature, top_k, top_p, min_p, seed, offset, samples = values
    if mode == 1:
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        context.run(1, _raw(logits), temperature, top_k, top_p, min_p, 0, 0, 1,
                    *map(_raw_or_none, per_row[:4]), None, _raw(out), None)
        return out
    shape = tuple(logits.shape[:-1]) + (samples,)
    tokens = torch.empty(shape, dtype=torch.int32, device=logits.device)
    logprobs = torch.empty(shape if return_logprobs else (0,), dtype=torch.float32,
                           device=logits.device)
    context.run(0, _raw(logits), temperature, top_k, top_p, min_p, seed, offset, samples,
                *map(_raw_or_none, per_row), _raw(tokens),
                _raw(logprobs) if return_logprobs else None)
    return tokens, logprobs


def _eager(mode, logits, backend, values, per_row, return_logprobs):
    """polysample.sample / probs on a tensor: the op's work without the
    dispatcher (which only matters when tracing)."""
    code, index = parse_backend(backend)
    if index is not None and logits.device.type == "cuda" and index != logits.device.index:
        raise Error("WRONG_BACKEND", f"backend {backend!r} names device {index}; the logits "
                                     f"are on {logits.device}")
    rows, vocab = _check_logits(logits)
    per_row = _prepare_per_row(per_row, logits.device)
    context = _context_for(logits.device, code, rows, vocab, values[6])
    result = _run(mode, context, logits, values, per_row, return_logprobs)
    if mode == 1:
        return result
    return result if return_logprobs else result[0]


def _run_on_context(context, mode, logits, values, per_row, return_logprobs):
    """polysample.Context.sample / probs on a tensor: the Context's own
    stream, so it waits for torch's stream before and for itself after."""
    _check_logits(logits)
    per_row = _prepare_per_row(per_row, logits.device)
    if logits.device.type == "cuda":
        torch.cuda.current_stream(logits.device).synchronize()
    result = _run(mode, context._context, logits, values, per_row, return_logprobs)
    if logits.device.type == "cuda" and context._own_stream:
        context.synchronize()
    if mode == 1:
        return result
    return result if return_logprobs else result[0]


# The ops. Seeds and offsets are unsigned 64-bit in the C API and signed in
# a schema's `int`: the wrappers pass their two's-complement bits.
_library = torch.library.Library("polysample", "DEF")
_library.define(
    "sample(Tensor logits, float temperature, int top_k, float top_p, float min_p, int seed, "
    "int offset, int num_samples, Tensor? temperature_per_row, Tensor? top_k_per_row, "
    "Tensor? top_p_per_row, Tensor? min_p_per_row, Tensor? seed_per_row, "
    "bool return_logprobs) -> (Tensor, Tensor)")
_library.define(
    "probs(Tensor logits, float temperature, int top_k, float top_p, float min_p, "
    "Tensor? temperature_per_row, Tensor? top_k_per_row, Tensor? top_p_per_row, "
    "Tensor? min_p_per_row) -> Tensor")


def _sample_kernel(logits, temperature, top_k, top_p, min_p, seed, offset, num_samples,
                   temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,
                   seed_per_row, return_logprobs):
    values = scalars(temperature, top_k, top_p, min_p, seed & _UINT64_MASK,
                     offset & _UINT64_MASK, num_samples)
    rows, vocab = _check_logits(logits)
    per_row = (temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row, seed_per_row)
    context = _context_for(logits.device, None, rows, vocab, num_samples)
    return _run(0, context, logits, values, per_row, return_logprobs)


def _probs_kernel(logits, temperature, top_k, top_p, min_p, temperature_per_row,
                  top_k_per_row, top_p_per_row, min_p_per_row):
    values = scalars(temperature, top_k, top_p, min_p, 0, 0, 1)
    rows, vocab = _check_logits(logits)
    per_row = (temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row, None)
    context = _context_for(logits.device, None, rows, vocab, 1)
    return _run(1, context, logits, values, per_row, False)


for _key in ("CPU", "CUDA"):
    _library.impl("sample", _sample_kernel, _key)
    _library.impl("probs", _probs_kernel, _key)


@torch.library.register_fake("polysample::sample")
def _sample_fake(logits, temperature, top_k, top_p, min_p, seed, offset, num_samples,
                 temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,
                 seed_per_row, return_logprobs):
    shape = tuple(logits.shape[:-1]) + (num_samples,)
    tokens = logits.new_empty(shape, dtype=torch.int32)
    logprobs = logits.new_empty(shape if return_logprobs else (0,), dtype=torch.float32)
    return tokens, logprobs


@torch.library.register_fake("polysample::probs")
def _probs_fake(logits, temperature, top_k, top_p, min_p, temperature_per_row, top_k_per_row,
                top_p_per_row, min_p_per_row):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _signed64(value, name):
    value = int(value)
    if not 0 <= value <= _UINT64_MASK:
        raise Error("INVALID_PARAMETER", f"{name} is {value}; expected 0 to 2^64 - 1")
    return value - 2**64 if value >= 2**63 else value


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0,
           num_samples=1, temperature_per_row=None, top_k_per_row=None, top_p_per_row=None,
           min_p_per_row=None, seed_per_row=None, return_logprobs=False):
    """torch.ops.polysample.sample with polysample.sample's arguments.

    Per-row parameters are tensors on the logits' device (float32 for
    temperature, top-p, min-p; int32 for top-k; int64 for seeds, read as
    unsigned); other inputs are converted first. Returns tokens (int32,
    logits.shape[:-1] + (num_samples,)), or (tokens, logprobs)."""
    if not torch.compiler.is_compiling():
        scalars(temperature, top_k, top_p, min_p, seed, offset, num_samples)
        per_row = _prepare_per_row((temperature_per_row, top_k_per_row, top_p_per_row,
                                    min_p_per_row, seed_per_row), logits.device)
    else:
        per_row = (temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,
                   seed_per_row)
    tokens, logprobs = torch.ops.polysample.sample(
        logits, float(temperature), int(top_k), float(top_p), float(min_p),
        _signed64(seed, "seed"), _signed64(offset, "offset"), int(num_samples), *per_row,
        bool(return_logprobs))
    return (tokens, logprobs) if return_logprobs else tokens


def probs(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, temperature_per_row=None,
          top_k_per_row=None, top_p_per_row=None, min_p_per_row=None):
    """torch.ops.polysample.probs: the distribution sample() draws from."""
    per_row = (temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row)
    if not torch.compiler.is_compiling():
        scalars(temperature, top_k, top_p, min_p, 0, 0, 1)
        per_row = _prepare_per_row(per_row + (None,), logits.device)[:4]
    return torch.ops.polysample.probs(logits, float(temperature), int(top_k), float(top_p),
                                      float(min_p), *per_row)

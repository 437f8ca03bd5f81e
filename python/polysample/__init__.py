"""polysample: exact, cross-vendor token sampling from batches of logits.

    import numpy as np, polysample
    logits = np.random.default_rng(0).normal(size=(4, 32000)).astype(np.float32)
    tokens = polysample.sample(logits, temperature=0.8, top_p=0.9, seed=1234)
    # tokens: int32 array of shape (4, 1); the same on every backend

Inputs are any array with DLPack or the buffer protocol (NumPy, PyTorch,
JAX, ...), float32, float16 or bfloat16, 1-D (one row) or 2-D (rows x
vocab). The last dimension must be contiguous; the row stride is honoured
(a view such as logits[:, -1, :] of a (batch, seq, vocab) array is read in
place). Other layouts are refused with a message saying how to copy.

Results are arrays of the caller's framework: tokens (int32) of shape
logits.shape[:-1] + (num_samples,), logprobs (float32, same shape) when
return_logprobs=True, probs (float32, logits' shape) from probs().

backend=None picks the backend that owns the memory: host arrays run on the
CPU backend, CUDA tensors on CUDA (ROCm on HIP). backend="auto" applies the
C library's AUTO rule (POLYSAMPLE_BACKEND, else CUDA, HIP, OpenCL, CPU);
"cpu", "cuda", "hip", "opencl", optionally with ":N", name one.

filter_order picks another engine's filter order and rules (every backend).
verify() checks a speculative decoder's drafted tokens against the target's
logits (docs/SAMPLING.md section 7; CPU backend) and returns a VerifyResult.

See python/README.md for the PyTorch op (polysample.torch), CUDA graphs and
the benchmark (python -m polysample.bench).
"""
import logging
import operator
import sys
import threading
from collections import namedtuple

import numpy as np

from . import _core
from ._arguments import (ARRAY_NAMES, ARRAYS, BACKEND_CODES, BACKEND_NAMES, PROBS_ARRAYS,
                         ROW_INDICES, arrays_of, parse_backend, plain_processing_off,
                         plain_scalars, plain_top_off, scalars)
from ._errors import Error
from ._frameworks import HostResults, host_per_row, is_torch_tensor
from ._processing import NAMES as PROCESSING_NAMES
from ._processing import RowLists, processing_tuple
from . import _verify
from ._verify import VerifyResult

__all__ = ["Context", "Error", "RowLists", "SampleResult", "Sharded", "VerifyResult", "info",
           "probs", "sample", "verify", "__version__"]
__version__ = _core.version()

_logger = logging.getLogger("polysample")


class SampleResult(namedtuple("SampleResult", ("tokens", "logprobs", "top_tokens",
                                               "top_logprobs", "ranks"))):
    """What sample() returns with top_logprobs=N (docs/SAMPLING.md section
    6), arrays of the logits' framework, rows being the outputs' rows (none
    for 1-D logits without row_indices):
    tokens (int32) and logprobs (float32): rows + (num_samples,), the drawn
    tokens and their logprobs; top_tokens (int32) and top_logprobs
    (float32): rows + (N,), each row's N most probable tokens in the
    logprob mode, most probable first (-1 and -inf past the last candidate;
    -1 and NaN for a bad row); ranks (int32, rows + (num_samples,)): each
    drawn token's rank in that mode (1 = the most probable; -1 for a bad
    row), or None without return_ranks."""


_LOGPROB_MODES = {"processed": 0, "raw": 1}
# Read once: polysample.torch checks top-N requests while torch.compile
# traces, which cannot call into the extension.
_MAX_TOP_LOGPROBS = _core.max_top_logprobs()


def _top_request(top_logprobs, logprob_mode, return_ranks):
    """(N, mode code, return_ranks) for the top-N arguments, or None when
    top_logprobs is 0; Error for a bad combination."""
    try:
        count = operator.index(top_logprobs)
    except TypeError:
        raise Error("INVALID_ARGUMENT", f"top_logprobs must be an integer; got "
                                        f"{top_logprobs!r}") from None
    mode = _LOGPROB_MODES.get(logprob_mode) if isinstance(logprob_mode, str) else None
    if mode is None:
        raise Error("INVALID_ARGUMENT", f"logprob_mode must be 'processed' or 'raw'; got "
                                        f"{logprob_mode!r}")
    if count == 0:
        if return_ranks:
            raise Error("INVALID_ARGUMENT", "return_ranks needs top_logprobs (the ranks are in "
                                            "the order of the top-N logprobs' mode)")
        return None
    if not 1 <= count <= _MAX_TOP_LOGPROBS:
        raise Error("INVALID_PARAMETER", f"top_logprobs is {count}; expected 1 to "
                                         f"{_MAX_TOP_LOGPROBS} (0: none)")
    return count, mode, bool(return_ranks)


def _notice(message):
    # The library never prints; long steps (compiling OpenCL kernels at first
    # use) are told here. A WARNING reaches stderr even with logging unset.
    _logger.warning("polysample: %s", message)


def _device_synchronize_torch(value):
    torch = __import__("torch")
    if value.device.type == "cuda":
        torch.cuda.current_stream(value.device).synchronize()


class Context:
    """A backend and device, kept for reuse (workspace, compiled kernels).

    backend: "cpu", "cuda", "hip", "opencl" or "auto" (None: "auto");
        optionally "name:N" for device N.
    device: device index (None: the name's :N, else device 0 for CUDA and
        HIP, the backend's default otherwise).
    check_rows: a row with NaN/+inf or no finite logit raises
        Error("BAD_ROW") instead of giving token -1 (device backends then
        wait for the result).
    cpu_threads: CPU backend threads (0: OpenMP's default).
    native_stream: a cudaStream_t / hipStream_t / cl_command_queue as an
        integer to run on; None: the context's own stream.

    A Context is safe to share between threads (calls on it take turns).
    With its own stream, a call on PyTorch CUDA tensors first waits for
    torch's current stream and then for its own work, so results are ready
    on return; polysample.torch avoids both waits by running on torch's
    stream.
    """

    def __init__(self, backend=None, *, device=None, check_rows=False, cpu_threads=0,
                 native_stream=None):
        code, index = parse_backend(backend if backend is not None else "auto")
        if device is not None:
            index = device
        if index is None and code in (BACKEND_CODES["cuda"], BACKEND_CODES["hip"]):
            index = 0
        self._context = _core.Context(code, -1 if index is None else int(index),
                                      bool(check_rows), int(native_stream or 0),
                                      int(cpu_threads), _notice)
        self._own_stream = not native_stream
        self.device = index

    @property
    def backend(self):
        """The backend's name ("cpu", "cuda", ...), AUTO resolved."""
        return BACKEND_NAMES[self._context.backend]

    @property
    def device_name(self):
        return self._context.device_name

    @property
    def selection_reason(self):
        """Why AUTO chose this backend, or "requested"."""
        return self._context.selection_reason

    def __repr__(self):
        return f"polysample.Context(backend={self.backend!r}, device={self.device_name!r})"

    def reserve(self, rows, vocab, num_samples=1):
        """Reserves workspace so that calls up to this size allocate nothing."""
        self._context.reserve(int(rows), int(vocab), int(num_samples))

    def synchronize(self):
        """Waits until this context's queued work is done."""
        self._context.synchronize()

    def sample(self, logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0,
               offset=0, num_samples=1, temperature_per_row=None, top_k_per_row=None,
               top_p_per_row=None, min_p_per_row=None, seed_per_row=None,
               offset_per_row=None, subsequence_per_row=None, row_indices=None,
               seed_tensor=None, offset_tensor=None, workspace=None, return_logprobs=False,
               allowed_mask=None, logit_bias=None, history=None, prompt=None,
               repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
               top_logprobs=0, logprob_mode="processed", return_ranks=False,
               filter_order="polysample"):
        """Draws num_samples tokens per row; see polysample.sample."""
        values = scalars(temperature, top_k, top_p, min_p, seed, offset, num_samples,
                         filter_order)
        arrays = (temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,
                  seed_per_row, offset_per_row, subsequence_per_row, row_indices, seed_tensor,
                  offset_tensor)
        processing = _processing(logits, row_indices, dict(
            allowed_mask=allowed_mask, logit_bias=logit_bias, history=history, prompt=prompt,
            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty))
        top = _top_request(top_logprobs, logprob_mode, return_ranks)
        if is_torch_tensor(logits):
            from . import torch as polysample_torch
            return polysample_torch._run_on_context(self, 0, logits, values, arrays,
                                                    return_logprobs, workspace, processing, top)
        results = HostResults(logits)
        arrays = _host_arrays(arrays)
        rows = _output_rows(logits, arrays)
        tokens = results.empty(rows + (values[6],), "int32")
        logprobs = results.empty(rows + (values[6],), "float32") \
            if return_logprobs or top else None
        outputs = None
        if top:
            outputs = (results.empty(rows + (top[0],), "int32"),
                       results.empty(rows + (top[0],), "float32"),
                       results.empty(rows + (values[6],), "int32") if top[2] else None)
        self._context.run(0, logits, values, arrays, tokens, logprobs, workspace, processing,
                          None if top is None else top[:2] + outputs)
        if top:
            return SampleResult(*(None if array is None else results.result(array)
                                  for array in (tokens, logprobs) + outputs))
        if return_logprobs:
            return results.result(tokens), results.result(logprobs)
        return results.result(tokens)

    def probs(self, logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
              temperature_per_row=None, top_k_per_row=None, top_p_per_row=None,
              min_p_per_row=None, row_indices=None, workspace=None, allowed_mask=None,
              logit_bias=None, history=None, prompt=None, repetition_penalty=1.0,
              frequency_penalty=0.0, presence_penalty=0.0, filter_order="polysample"):
        """The distribution sample() draws from; see polysample.probs."""
        values = scalars(temperature, top_k, top_p, min_p, 0, 0, 1, filter_order)
        arrays = arrays_of(dict(temperature_per_row=temperature_per_row,
                                top_k_per_row=top_k_per_row, top_p_per_row=top_p_per_row,
                                min_p_per_row=min_p_per_row, row_indices=row_indices))
        processing = _processing(logits, row_indices, dict(
            allowed_mask=allowed_mask, logit_bias=logit_bias, history=history, prompt=prompt,
            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty))
        if is_torch_tensor(logits):
            from . import torch as polysample_torch
            return polysample_torch._run_on_context(self, 1, logits, values, arrays, False,
                                                    workspace, processing)
        results = HostResults(logits)
        arrays = _host_arrays(arrays)
        out = results.empty(_output_rows(logits, arrays) + (_shape(logits)[-1],), "float32")
        self._context.run(1, logits, values, arrays, out, None, workspace, processing)
        return results.result(out)

    def verify(self, target_logits, draft_tokens, *, parents=None, draft_logits=None,
               draft_probs=None, draft_temperature=1.0, draft_top_k=0, draft_top_p=1.0,
               draft_min_p=0.0, draft_filter_order="polysample",
               draft_temperature_per_row=None, draft_top_k_per_row=None,
               draft_top_p_per_row=None, draft_min_p_per_row=None, temperature=1.0, top_k=0,
               top_p=1.0, min_p=0.0, seed=0, offset=0, filter_order="polysample",
               temperature_per_row=None, top_k_per_row=None, top_p_per_row=None,
               min_p_per_row=None, seed_per_row=None, offset_per_row=None,
               subsequence_per_row=None, seed_tensor=None, offset_tensor=None):
        """Verifies drafted tokens on this context; see polysample.verify."""
        return _verify.run(
            self, target_logits, draft_tokens, parents, draft_logits, draft_probs,
            dict(temperature=draft_temperature, top_k=draft_top_k, top_p=draft_top_p,
                 min_p=draft_min_p, filter_order=draft_filter_order),
            dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                 offset=offset, filter_order=filter_order),
            dict(temperature_per_row=temperature_per_row, top_k_per_row=top_k_per_row,
                 top_p_per_row=top_p_per_row, min_p_per_row=min_p_per_row,
                 seed_per_row=seed_per_row, offset_per_row=offset_per_row,
                 subsequence_per_row=subsequence_per_row, seed_tensor=seed_tensor,
                 offset_tensor=offset_tensor),
            dict(temperature_per_row=draft_temperature_per_row,
                 top_k_per_row=draft_top_k_per_row, top_p_per_row=draft_top_p_per_row,
                 min_p_per_row=draft_min_p_per_row))

    def sharded(self, logits, *, first_token, full_vocab, shard_index, shard_count,
                temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0,
                num_samples=1, temperature_per_row=None, top_k_per_row=None,
                top_p_per_row=None, min_p_per_row=None, seed_per_row=None,
                offset_per_row=None, subsequence_per_row=None, row_indices=None):
        """Starts a sharded call on this rank's columns of rows split by
        vocabulary (docs/SAMPLING.md section 8): logits holds the columns
        first_token .. first_token + logits.shape[-1] - 1 of rows of
        full_vocab tokens, and this rank is shard_index of shard_count in
        every all-gather. Every rank passes the same sampling arguments (as
        for sample(); host arrays). Returns a Sharded: call next() with each
        round's all-gather until it returns None, then result() is what
        sample(..., return_logprobs=True) gives on the whole rows, bit for
        bit. Runs on the CPU backend with host logits so far."""
        values = scalars(temperature, top_k, top_p, min_p, seed, offset, num_samples)
        arrays = _host_arrays((temperature_per_row, top_k_per_row, top_p_per_row,
                               min_p_per_row, seed_per_row, offset_per_row,
                               subsequence_per_row, row_indices, None, None))
        rows = _output_rows(logits, arrays)
        output_rows = 1
        for extent in rows:
            output_rows *= extent
        call = self._context.sharded(logits, _index(first_token, "first_token"),
                                     _index(full_vocab, "full_vocab"),
                                     _index(shard_index, "shard_index"),
                                     _index(shard_count, "shard_count"), values, arrays,
                                     output_rows)
        return Sharded(call, rows + (values[6],))

    def sample_workspace_size(self, logits, **arguments):
        """The bytes of workspace that sample(logits, **arguments) needs on
        this context: the same keyword arguments as sample(), without
        workspace. Only the shapes, the memory and which arrays are given
        decide it (array contents are not read)."""
        return self._workspace_size(0, logits, arguments)

    def probs_workspace_size(self, logits, **arguments):
        """The bytes of workspace that probs(logits, **arguments) needs."""
        return self._workspace_size(1, logits, arguments)

    def _workspace_size(self, mode, logits, arguments):
        names = ARRAY_NAMES if mode == 0 else PROBS_ARRAYS
        scalar_names = ("temperature", "top_k", "top_p", "min_p", "filter_order") + \
            (("seed", "offset", "num_samples", "return_logprobs", "top_logprobs",
              "logprob_mode", "return_ranks") if mode == 0 else ())
        unknown = set(arguments) - set(names) - set(scalar_names) - set(PROCESSING_NAMES)
        if unknown:
            raise Error("INVALID_ARGUMENT", f"unknown arguments {sorted(unknown)} (workspace "
                                            "is what this sizes; leave it out)")
        defaults = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0,
                        num_samples=1, filter_order="polysample")
        defaults.update((key, value) for key, value in arguments.items() if key in defaults)
        values = scalars(*(defaults[name] for name in (
            "temperature", "top_k", "top_p", "min_p", "seed", "offset", "num_samples",
            "filter_order")))
        arrays = arrays_of(arguments)
        processing = _processing(logits, arguments.get("row_indices"), arguments)
        top = _top_request(arguments.get("top_logprobs", 0),
                           arguments.get("logprob_mode", "processed"),
                           arguments.get("return_ranks", False)) if mode == 0 else None
        return_logprobs = bool(arguments.get("return_logprobs")) or top is not None
        if is_torch_tensor(logits):
            from . import torch as polysample_torch
            return polysample_torch._workspace_size(self._context, mode, logits, values, arrays,
                                                    return_logprobs, processing, top)
        arrays = _host_arrays(arrays)
        rows = _output_rows(logits, arrays)
        outputs = None
        if mode == 0:
            out = np.empty(rows + (values[6],), np.int32)
            logprobs = out.view(np.float32) if return_logprobs else None
            if top:
                outputs = top[:2] + (np.empty(rows + (top[0],), np.int32),
                                     np.empty(rows + (top[0],), np.float32),
                                     out if top[2] else None)
        else:
            out, logprobs = np.empty(rows + (_shape(logits)[-1],), np.float32), None
        return self._context.workspace_size(mode, logits, values, arrays, out, logprobs,
                                            processing, outputs)


def _shape(array):
    shape = getattr(array, "shape", None)
    if shape is None:
        raise Error("INVALID_ARGUMENT", f"logits must be an array; got {type(array).__name__}")
    if len(shape) not in (1, 2):
        raise Error("INVALID_ARGUMENT", f"logits must be 1-D or 2-D; got {len(shape)}-D")
    return shape


def _index(value, name):
    """A non-negative integer argument of the sharded call."""
    try:
        value = operator.index(value)
    except TypeError:
        raise Error("INVALID_ARGUMENT", f"{name} must be an integer") from None
    if not 0 <= value < 2**62:
        raise Error("INVALID_ARGUMENT", f"{name} is {value}; expected 0 or more")
    return value


class Sharded:
    """A sharded call on one rank (Context.sharded). next(gathered) takes the
    previous round's all-gather (every rank's bytes concatenated in
    shard_index order; None the first time) and returns this rank's bytes
    for the next one, the same length on every rank, or None when the call
    is over; result() then gives (tokens, logprobs) as NumPy arrays."""

    def __init__(self, call, shape):
        self._call = call
        self._shape = shape
        self._result = None

    def next(self, gathered=None):
        if gathered is not None and not isinstance(gathered, bytes):
            gathered = bytes(memoryview(gathered))
        return self._call.next(gathered)

    def result(self):
        if self._result is None:
            tokens, logprobs = self._call.outputs()
            self._result = (np.frombuffer(tokens, dtype=np.int32).reshape(self._shape),
                            np.frombuffer(logprobs, dtype=np.float32).reshape(self._shape))
        return self._result


def _output_rows(logits, arrays):
    """The outputs' leading shape: (len(row_indices),) with row indices,
    else the logits' shape without its last dimension."""
    indices = arrays[ROW_INDICES]
    if indices is None:
        return tuple(_shape(logits)[:-1])
    if indices.ndim != 1:
        raise Error("INVALID_ARGUMENT", f"row_indices must be 1-D; got {indices.ndim}-D")
    return (len(indices),)


def _processing(logits, row_indices, arguments):
    """The extension's processing tuple for these outputs, or None."""
    if row_indices is not None:
        dimensions = row_indices.dim() if is_torch_tensor(row_indices) else np.ndim(row_indices)
        if dimensions != 1:
            raise Error("INVALID_ARGUMENT", f"row_indices must be 1-D; got {dimensions}-D")
        rows, one_row = len(row_indices), False
    else:
        shape = _shape(logits)
        rows, one_row = (shape[0], False) if len(shape) == 2 else (1, True)
    return processing_tuple(arguments, rows, _shape(logits)[-1], one_row)


def _host_arrays(values):
    return tuple(host_per_row(value, kind, name)
                 for value, (name, kind) in zip(values, ARRAYS))


_cached = threading.local()


def _default_context(backend, check_rows=False):
    """One Context per backend name, check_rows and thread, made at first use."""
    contexts = getattr(_cached, "contexts", None)
    if contexts is None:
        contexts = _cached.contexts = {}
    key = (backend or "cpu", bool(check_rows))
    context = contexts.get(key)
    if context is None:
        context = contexts[key] = Context(key[0], check_rows=key[1])
    return context


def _torch_module():
    """polysample.torch, imported at first use (it imports torch)."""
    module = sys.modules.get(__name__ + ".torch")
    if module is None:
        from . import torch as module
    return module


def _plain_host_call(mode, context, logits, values, return_logprobs):
    """sample (mode 0) or probs (1) on a NumPy array with scalars only
    (polysample._arguments.plain_scalars' values): no arrays, processing,
    top-N or workspace, so nothing but the outputs to make."""
    shape = logits.shape
    if len(shape) not in (1, 2):
        raise Error("INVALID_ARGUMENT", f"logits must be 1-D or 2-D; got {len(shape)}-D")
    if mode == 1:
        out = np.empty(shape, np.float32)
        context._context.run(1, logits, values, (), out, None, None)
        return out
    rows = shape[:-1] + (values[6],)
    tokens = np.empty(rows, np.int32)
    logprobs = np.empty(rows, np.float32) if return_logprobs else None
    context._context.run(0, logits, values, (), tokens, logprobs, None)
    return (tokens, logprobs) if return_logprobs else tokens


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0,
           num_samples=1, temperature_per_row=None, top_k_per_row=None, top_p_per_row=None,
           min_p_per_row=None, seed_per_row=None, offset_per_row=None, subsequence_per_row=None,
           row_indices=None, seed_tensor=None, offset_tensor=None, workspace=None,
           return_logprobs=False, allowed_mask=None, logit_bias=None, history=None, prompt=None,
           repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
           top_logprobs=0, logprob_mode="processed", return_ranks=False,
           filter_order="polysample", backend=None):
    """Draws num_samples tokens per row of logits (docs/SAMPLING.md).

    temperature: below 1e-5 (0 included) is greedy. top_k: 0 = off.
    top_p: in (0, 1], 1 = off. min_p: in [0, 1], 0 = off. seed, offset:
    0 to 2^64 - 1 (offset: e.g. the decoding step). *_per_row: one value per
    output row, overriding the scalar (arrays of the logits' framework and
    device, or sequences for host logits): offset_per_row (e.g. each
    sequence's position), subsequence_per_row (each row's random stream, so
    that rows with the same seed and offset draw independently).
    row_indices: output row i samples logits row row_indices[i]; outputs
    then have len(row_indices) rows. seed_tensor, offset_tensor: a
    one-element array in the logits' memory holding the seed or offset,
    read when the call runs (with CUDA tensors, when the kernels run: a
    captured CUDA graph draws anew once the tensor changes). workspace: a
    1-D uint8 array of at least Context.sample_workspace_size() bytes in the
    backend's memory (host for the CPU backend, the device for CUDA/HIP);
    with it the call allocates nothing. Returns tokens, or (tokens,
    logprobs) with return_logprobs=True; a row with NaN/+inf or no finite
    logit gets token -1 and logprob NaN.

    Logit processing (docs/SAMPLING.md section 1; every backend runs it),
    applied as the logits are read, per
    output row: the penalties for tokens of the row's history (and, for
    repetition, its prompt), then the bias, then the mask.
    allowed_mask: bool (rows, vocab), True = allowed, or uint32 (rows,
    words) with bit i % 32 of word i // 32 for token i; a row that allows
    no valid token is a bad row. logit_bias: {token: bias} for every row, a
    list of such dicts (or None) per row, or RowLists(offsets, tokens,
    values). history, prompt: a list of token sequences per row, or
    RowLists(offsets, tokens). repetition_penalty (in [1e-3, 1e3], 1 = off),
    frequency_penalty and presence_penalty (in [-1e3, 1e3], 0 = off): a
    number, or one value per row. For 1-D logits without row_indices the
    row dimension is left out (a 1-D mask, one dict, one token sequence).
    These are host data; with tensors on a device they are copied there.

    Top-N logprobs (docs/SAMPLING.md section 6; every backend runs them):
    top_logprobs=N (1 to 64; 0: none)
    returns a SampleResult (tokens, logprobs, top_tokens, top_logprobs,
    ranks) instead: each row's N most probable tokens and their logprobs in
    logprob_mode "processed" (the distribution the row is drawn from: after
    processing, temperature and filters) or "raw" (the log-softmax of the
    logits as given), with the drawn tokens' logprobs, and with
    return_ranks=True each drawn token's rank in that mode (1 = the most
    probable).

    filter_order: whose order and rules the filters follow (docs/SAMPLING.md
    section 4, "Filter orders"): "polysample" (the default), "vllm",
    "sglang", "llama.cpp", "flashinfer_top_k_first" or "flashinfer_joint"
    (or the command-line tool's "flashinfer-top-k-first",
    "flashinfer-joint"); another name raises a ValueError (a polysample.Error
    with status INVALID_ARGUMENT) listing them. Only the CPU backend runs
    orders other than "polysample"; the others raise UNSUPPORTED.
    """
    # The common call (scalars only) skips the general path's conversions:
    # the same checks, the same C call.
    if (temperature_per_row is None and top_k_per_row is None and top_p_per_row is None
            and min_p_per_row is None and seed_per_row is None and offset_per_row is None
            and subsequence_per_row is None and row_indices is None and seed_tensor is None
            and offset_tensor is None and workspace is None
            and plain_processing_off(allowed_mask, logit_bias, history, prompt,
                                     repetition_penalty, frequency_penalty, presence_penalty)
            and plain_top_off(top_logprobs, logprob_mode, return_ranks)):
        values = plain_scalars(temperature, top_k, top_p, min_p, seed, offset, num_samples,
                               filter_order)
        if values is not None:
            if type(logits) is np.ndarray:
                return _plain_host_call(0, _default_context(backend), logits, values,
                                        bool(return_logprobs))
            if backend is None and is_torch_tensor(logits):
                polysample_torch = _torch_module()
                if polysample_torch.KERNELS == "c++":
                    return polysample_torch._plain_sample(logits, values, return_logprobs)
    values = scalars(temperature, top_k, top_p, min_p, seed, offset, num_samples, filter_order)
    arrays = (temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row, seed_per_row,
              offset_per_row, subsequence_per_row, row_indices, seed_tensor, offset_tensor)
    processing = dict(allowed_mask=allowed_mask, logit_bias=logit_bias, history=history,
                      prompt=prompt, repetition_penalty=repetition_penalty,
                      frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
    top = dict(top_logprobs=top_logprobs, logprob_mode=logprob_mode, return_ranks=return_ranks)
    if is_torch_tensor(logits):
        from . import torch as polysample_torch
        return polysample_torch._eager(0, logits, backend, values, arrays, return_logprobs,
                                       workspace, _processing(logits, row_indices, processing),
                                       _top_request(**top))
    parse_backend(backend)
    return _default_context(backend).sample(
        logits, **dict(zip(("temperature", "top_k", "top_p", "min_p", "seed", "offset",
                            "num_samples"), values)),
        **dict(zip(ARRAY_NAMES, arrays)), workspace=workspace, return_logprobs=return_logprobs,
        **processing, **top, filter_order=filter_order)


def probs(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, temperature_per_row=None,
          top_k_per_row=None, top_p_per_row=None, min_p_per_row=None, row_indices=None,
          workspace=None, allowed_mask=None, logit_bias=None, history=None, prompt=None,
          repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
          filter_order="polysample", backend=None):
    """The final (filtered, renormalised) distribution sample() draws from,
    float32 of the logits' shape (with row_indices: len(row_indices) rows);
    a bad row is all NaN. workspace: as for sample(), sized by
    Context.probs_workspace_size(); logit processing and filter_order as
    for sample()."""
    if (temperature_per_row is None and top_k_per_row is None and top_p_per_row is None
            and min_p_per_row is None and row_indices is None and workspace is None
            and plain_processing_off(allowed_mask, logit_bias, history, prompt,
                                     repetition_penalty, frequency_penalty, presence_penalty)):
        values = plain_scalars(temperature, top_k, top_p, min_p, 0, 0, 1, filter_order)
        if values is not None:
            if type(logits) is np.ndarray:
                return _plain_host_call(1, _default_context(backend), logits, values, False)
            if backend is None and is_torch_tensor(logits):
                polysample_torch = _torch_module()
                if polysample_torch.KERNELS == "c++":
                    return polysample_torch._plain_probs(logits, values)
    values = scalars(temperature, top_k, top_p, min_p, 0, 0, 1, filter_order)
    processing = dict(allowed_mask=allowed_mask, logit_bias=logit_bias, history=history,
                      prompt=prompt, repetition_penalty=repetition_penalty,
                      frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
    if is_torch_tensor(logits):
        from . import torch as polysample_torch
        arrays = arrays_of(dict(temperature_per_row=temperature_per_row,
                                top_k_per_row=top_k_per_row, top_p_per_row=top_p_per_row,
                                min_p_per_row=min_p_per_row, row_indices=row_indices))
        return polysample_torch._eager(1, logits, backend, values, arrays, False, workspace,
                                       _processing(logits, row_indices, processing))
    parse_backend(backend)
    return _default_context(backend).probs(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        temperature_per_row=temperature_per_row, top_k_per_row=top_k_per_row,
        top_p_per_row=top_p_per_row, min_p_per_row=min_p_per_row, row_indices=row_indices,
        workspace=workspace, **processing, filter_order=filter_order)


def verify(target_logits, draft_tokens, *, parents=None, draft_logits=None, draft_probs=None,
           draft_temperature=1.0, draft_top_k=0, draft_top_p=1.0, draft_min_p=0.0,
           draft_filter_order="polysample", draft_temperature_per_row=None,
           draft_top_k_per_row=None, draft_top_p_per_row=None, draft_min_p_per_row=None,
           temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0,
           filter_order="polysample", temperature_per_row=None, top_k_per_row=None,
           top_p_per_row=None, min_p_per_row=None, seed_per_row=None, offset_per_row=None,
           subsequence_per_row=None, seed_tensor=None, offset_tensor=None, backend=None,
           check_rows=False):
    """Speculative decoding verification (docs/SAMPLING.md section 7): checks
    each request's k drafted tokens against the target model's logits by
    exact rejection sampling in integers and draws one more token from the
    target, so that the emitted tokens follow the target's distribution
    and every backend accepts the same tokens. Returns a VerifyResult
    (accepted, tokens, path_nodes, logprobs) of the target logits'
    framework; request r emits tokens[r, :accepted[r] + 1].

    target_logits: (requests, k + 1, vocab), or (requests * (k + 1), vocab)
        as the C API takes them: [r, i] is the target's logits after node
        i's path (node 0, the root, is the last token already emitted).
    draft_tokens: (requests, k) integers: the token of node i at [r, i - 1].
    parents: None (a chain: node i follows node i - 1) or (requests, k)
        integers: node i's parent, an earlier node 0 .. i - 1 (a tree).
    The distribution each node's token was drawn from (given its parent's
    path and its earlier siblings), one of:
    draft_logits: (requests, k, vocab) or (requests * k, vocab), shaped by
        draft_temperature, draft_top_k, draft_top_p, draft_min_p,
        draft_filter_order and their draft_*_per_row arrays (one value per
        request), as the target's parameters are;
    draft_probs: the same shapes, float32 probabilities in [0, 1];
    neither: one-hot drafts (n-gram, prompt lookup, a greedy draft model).
    temperature, top_k, top_p, min_p, seed, offset, filter_order and the
    *_per_row arrays, seed_tensor, offset_tensor: the target's, as for
    sample(), with one value per request (a request's seed, offset and
    stream are those of output row r of sample()).
    check_rows: a request with a bad target row (NaN, +inf, no finite
    logit) raises Error("BAD_ROW") instead of getting -1 everywhere.

    Bad drafts (a token outside the vocab or one its draft distribution
    gives probability 0, a parent that is not an earlier node, a
    probability outside [0, 1]) raise Error("INVALID_PARAMETER") with the
    library's message naming the request and node, and nothing is written.
    Every backend verifies, with the same results.
    """
    backend = _verify.module_backend(target_logits, backend)
    parse_backend(backend)
    return _default_context(backend, check_rows).verify(
        target_logits, draft_tokens, parents=parents, draft_logits=draft_logits,
        draft_probs=draft_probs, draft_temperature=draft_temperature, draft_top_k=draft_top_k,
        draft_top_p=draft_top_p, draft_min_p=draft_min_p, draft_filter_order=draft_filter_order,
        draft_temperature_per_row=draft_temperature_per_row,
        draft_top_k_per_row=draft_top_k_per_row, draft_top_p_per_row=draft_top_p_per_row,
        draft_min_p_per_row=draft_min_p_per_row, temperature=temperature, top_k=top_k,
        top_p=top_p, min_p=min_p, seed=seed, offset=offset, filter_order=filter_order,
        temperature_per_row=temperature_per_row, top_k_per_row=top_k_per_row,
        top_p_per_row=top_p_per_row, min_p_per_row=min_p_per_row, seed_per_row=seed_per_row,
        offset_per_row=offset_per_row, subsequence_per_row=subsequence_per_row,
        seed_tensor=seed_tensor, offset_tensor=offset_tensor)


def info():
    """The version and, per backend: compiled in, available now (and why
    not), device count."""
    return {"version": __version__, "backends": _core.backend_info()}

"""Speculative decoding verification (docs/SAMPLING.md section 7) for
polysample.verify and Context.verify: the arguments are checked and shaped
here, the call is the extension's (python/src/core.cpp, Context::verify).

A request has k draft nodes. The target's logits are (requests, k + 1,
vocab), as a runtime holds them, or the C API's flat (requests * (k + 1),
vocab); the draft's logits or probabilities likewise (requests, k, vocab)
or (requests * k, vocab). A 3-D array is read in place as rows when its
requests lie k + 1 (or k) rows apart, as in any array a reshape made 3-D;
otherwise it is refused with a message saying how to copy.
"""
from collections import namedtuple

import numpy as np

from ._arguments import ARRAYS, INT32_MAX, INT32_MIN, arrays_of, scalars
from ._errors import Error
from ._frameworks import HostResults, _host_array, host_per_row, is_torch_tensor


class VerifyResult(namedtuple("VerifyResult", ("accepted", "tokens", "path_nodes",
                                               "logprobs"))):
    """What verify() returns, arrays of the target logits' framework:
    accepted (int32, (requests,)): the accepted draft tokens per request, 0
    up to the tree's depth, -1 for a bad request; tokens (int32, (requests,
    k + 1)): the accepted draft tokens in path order, then the correction
    (after a rejection) or bonus token (after a path that reached a leaf),
    then -1, so that request r emits tokens[r, :accepted[r] + 1];
    path_nodes (int32, (requests, k + 1)): the node each emitted token was
    drawn at, 0 (the root) then the accepted nodes, whose cache entries a
    runtime keeps, then -1; logprobs (float32, (requests, k + 1)): each
    emitted token's natural log probability under the target's
    distribution at its node, then NaN. A bad request has -1 (and NaN)
    everywhere."""


# The target's per-request arrays are sample()'s but row_indices (a
# verification reads row r * (k + 1) + i for node i of request r); the
# draft's are its filters' (nothing is drawn from the draft).
TARGET_ARRAYS = tuple(name for name, _ in ARRAYS if name != "row_indices")
DRAFT_ARRAYS = ("temperature_per_row", "top_k_per_row", "top_p_per_row", "min_p_per_row")
DRAFT_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                      filter_order="polysample")


def _flatten(array, requests, positions, name, positions_text):
    """A 3-D (requests, positions, vocab) array as (requests * positions,
    vocab) rows without a copy; a 2-D one as it is (the extension checks
    its rows)."""
    shape = tuple(array.shape)
    if len(shape) == 2:
        return array
    if len(shape) != 3:
        raise Error("INVALID_ARGUMENT", f"{name} must be 3-D (requests, {positions_text}, vocab) "
                                        f"or 2-D (requests * ({positions_text}), vocab); got "
                                        f"{len(shape)}-D")
    if shape[:2] != (requests, positions):
        raise Error("INVALID_ARGUMENT", f"{name} has shape {shape}; draft_tokens' {requests} "
                                        f"requests of k = {positions_text} nodes need "
                                        f"({requests}, {positions}, vocab)")
    strides = array.stride() if is_torch_tensor(array) else array.strides
    if requests > 1 and strides[0] != positions * strides[1]:
        raise Error("INVALID_ARGUMENT",
                    f"{name}: its requests are not {positions_text} rows apart, so that its "
                    "rows are not one array of rows; copy it first, e.g. "
                    "numpy.ascontiguousarray(x) or x.contiguous()")
    # With the strides above the reshape is a view (NumPy and torch copy
    # only when it cannot be).
    return array.reshape(requests * positions, shape[2])


def _host_nodes(value, name):
    """draft_tokens or parents as a 2-D int32 NumPy array: integers only,
    each fitting int32 (a conversion from another integer type copies)."""
    array = np.asarray(value) if isinstance(value, (list, tuple)) else _host_array(value, name)
    if array.dtype.kind not in "iu":
        raise Error("INVALID_ARGUMENT", f"{name} must hold integers; got {array.dtype}")
    if array.ndim != 2:
        raise Error("INVALID_ARGUMENT", f"{name} must be 2-D (requests, k); got {array.ndim}-D "
                                        "(one request is (1, k))")
    if array.size and (int(array.min()) < INT32_MIN or int(array.max()) > INT32_MAX):
        raise Error("INVALID_PARAMETER", f"{name} has values outside the int32 range")
    return np.ascontiguousarray(array, dtype=np.int32)


def _torch_nodes(value, name, device):
    """draft_tokens or parents as a 2-D int32 tensor on the target's device."""
    torch = __import__("torch")
    if not isinstance(value, torch.Tensor):
        value = torch.from_numpy(_host_nodes(value, name))
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise Error("INVALID_ARGUMENT", f"{name} must hold integers; got {value.dtype}")
    if value.dim() != 2:
        raise Error("INVALID_ARGUMENT", f"{name} must be 2-D (requests, k); got {value.dim()}-D "
                                        "(one request is (1, k))")
    if value.dtype != torch.int32:
        # Read on the host to check the range: a device tensor waits here.
        if value.numel() and (int(value.min()) < INT32_MIN or int(value.max()) > INT32_MAX):
            raise Error("INVALID_PARAMETER", f"{name} has values outside the int32 range")
        value = value.to(torch.int32)
    return value.to(device).contiguous()


def run(context, target_logits, draft_tokens, parents, draft_logits, draft_probs, draft,
        target, target_arrays, draft_arrays):
    """One verification on a polysample.Context. draft: the draft's scalars
    (DRAFT_DEFAULTS' keys); target: temperature, top_k, top_p, min_p, seed,
    offset, filter_order; target_arrays and draft_arrays: dicts of the
    per-request arrays given (None for those not)."""
    values = scalars(target["temperature"], target["top_k"], target["top_p"], target["min_p"],
                     target["seed"], target["offset"], 1, target["filter_order"])
    draft_values = scalars(draft["temperature"], draft["top_k"], draft["top_p"],
                           draft["min_p"], 0, 0, 1, draft["filter_order"])
    # The draft's parameters shape draft_logits; given without them, the
    # library refuses them (so only defaults may go unsaid).
    draft_given = draft_logits is not None or draft != DRAFT_DEFAULTS or \
        any(value is not None for value in draft_arrays.values())
    on_torch = is_torch_tensor(target_logits)
    if on_torch:
        from . import torch as polysample_torch
        torch = polysample_torch.torch
        device = target_logits.device
        tokens = _torch_nodes(draft_tokens, "draft_tokens", device)
        parents = None if parents is None else _torch_nodes(parents, "parents", device)

        def per_request(given, prefix):
            return tuple(polysample_torch._array_tensor(value, dtypes, prefix + name, kind, device)
                         for value, dtypes, (name, kind) in
                         zip(arrays_of(given), polysample_torch._ARRAY_DTYPES, ARRAYS))

        def empty(shape, dtype):
            return torch.empty(shape, dtype=getattr(torch, dtype), device=device)
    else:
        results = HostResults(target_logits)
        target_logits = _host_array(target_logits, "target_logits")
        tokens = _host_nodes(draft_tokens, "draft_tokens")
        parents = None if parents is None else _host_nodes(parents, "parents")
        draft_logits = None if draft_logits is None else _host_array(draft_logits,
                                                                     "draft_logits")
        draft_probs = None if draft_probs is None else _host_array(draft_probs, "draft_probs")

        def per_request(given, prefix):
            return tuple(host_per_row(value, kind, prefix + name)
                         for value, (name, kind) in zip(arrays_of(given), ARRAYS))

        empty = results.empty
    requests, nodes = tuple(tokens.shape)
    target_rows = _flatten(target_logits, requests, nodes + 1, "target_logits", "k + 1")
    if draft_logits is not None:
        draft_logits = _flatten(draft_logits, requests, nodes, "draft_logits", "k")
    if draft_probs is not None:
        draft_probs = _flatten(draft_probs, requests, nodes, "draft_probs", "k")
    outputs = (empty((requests,), "int32"), empty((requests, nodes + 1), "int32"),
               empty((requests, nodes + 1), "int32"), empty((requests, nodes + 1), "float32"))
    draft_params = (draft_values, per_request(draft_arrays, "draft_")) if draft_given else None
    waits = on_torch and target_logits.device.type == "cuda"
    if waits:
        torch.cuda.current_stream(device).synchronize()
    context._context.verify(target_rows, values, per_request(target_arrays, ""),
                            (tokens, parents, draft_logits, draft_probs), draft_params, outputs)
    if waits and context._own_stream:
        context.synchronize()
    if on_torch:
        return VerifyResult(*outputs)
    return VerifyResult(*(results.result(array) for array in outputs))


def module_backend(target_logits, backend):
    """verify()'s backend name: as given, else where the memory is (a CUDA
    tensor's device; host arrays: the CPU backend)."""
    if backend is not None or not is_torch_tensor(target_logits):
        return backend
    device = target_logits.device
    if device.type != "cuda":
        return None
    from . import torch as polysample_torch
    name = "hip" if polysample_torch._IS_ROCM else "cuda"
    index = device.index if device.index is not None else \
        polysample_torch.torch.cuda.current_device()
    return f"{name}:{index}"

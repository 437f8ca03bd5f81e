"""Logit processing arguments (docs/SAMPLING.md, section 1) as the C struct
psm_logit_processing takes them: an allowed-token bitmask, per-row lists in
CSR form, and the penalties.

The forms a caller may give, for `rows` output rows:
- allowed_mask: bool of shape (rows, vocab), True = allowed, packed here
  into 32-bit words; or uint32 of shape (rows, words), words >= ceil(vocab
  / 32), bit i % 32 of word i // 32 for token i, as the C API takes it.
- logit_bias: one dict {token: bias} for every row; a list of one dict (or
  None) per row; or RowLists(offsets, tokens, values).
- history, prompt: a list of one token sequence per row; or
  RowLists(offsets, tokens).
- the penalties: a number for every row, or one value per row.
When the outputs have no row dimension (1-D logits, no row_indices) the row
dimension is left out here too: a 1-D mask, a dict, a token sequence.
"""
from collections import namedtuple

import numpy as np

from ._errors import Error
from ._frameworks import host_per_row, is_torch_tensor

NAMES = ("allowed_mask", "logit_bias", "history", "prompt", "repetition_penalty",
         "frequency_penalty", "presence_penalty")
_OFF = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


class RowLists(namedtuple("RowLists", ("offsets", "tokens", "values"), defaults=(None,))):
    """Per-row lists in CSR form: row r's entries are
    tokens[offsets[r]:offsets[r + 1]] (and values[...] for logit_bias), with
    len(offsets) == rows + 1, offsets non-decreasing from 0. For a runtime
    that keeps its histories flat: nothing is rebuilt per row."""


def given(arguments):
    """Whether any processing argument asks for something."""
    return any(arguments.get(name) is not None for name in NAMES[:4]) or any(
        not _is_number(arguments.get(name, off)) or arguments.get(name, off) != off
        for name, off in _OFF.items())


def _is_number(value):
    return np.ndim(value) == 0 and not isinstance(value, (str, bytes))


def _host(value):
    """Tensors among the arguments as NumPy arrays (processing arrays are
    prepared on the host; see processing_tuple)."""
    if is_torch_tensor(value):
        return value.detach().cpu().numpy()
    if isinstance(value, RowLists):
        return RowLists(*map(_host, value))
    if isinstance(value, (list, tuple)):
        return type(value)(map(_host, value))
    return value


def _is_token_row(value):
    """One row's tokens (a 1-D array, or a list of numbers), as opposed to a
    list of rows."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    return isinstance(value, (list, tuple)) and all(np.ndim(item) == 0 for item in value)


def _row_items(value, name, rows, one_row, is_row):
    """The per-row entries of a list-of-rows argument: `value` itself as the
    one row when the outputs have no row dimension, else its items, one per
    row."""
    if one_row and is_row(value):
        return [value]
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise Error("INVALID_ARGUMENT", f"{name} must be a list with one entry per output row "
                                        f"({rows}) or RowLists; got {type(value).__name__}")
    if len(value) != rows:
        raise Error("INVALID_ARGUMENT", f"{name} has {len(value)} rows; expected one per "
                                        f"output row ({rows})")
    return list(value)


def _csr(name, lists, rows, with_values):
    """RowLists -> (offsets int64, tokens int32, values float32 or None),
    lengths checked so that the library reads only these arrays."""
    offsets = host_per_row(lists.offsets, "int64", f"{name} offsets")
    tokens = host_per_row(lists.tokens, "int32", f"{name} tokens")
    values = None
    if with_values:
        if lists.values is None:
            raise Error("INVALID_ARGUMENT", f"{name}: RowLists needs values (the biases)")
        values = host_per_row(lists.values, "float32", f"{name} values")
        if values.shape != tokens.shape:
            raise Error("INVALID_ARGUMENT", f"{name} has {tokens.size} tokens but "
                                            f"{values.size} values; expected one per token")
    elif lists.values is not None:
        raise Error("INVALID_ARGUMENT", f"{name}: RowLists of token lists take no values")
    if offsets.ndim != 1 or tokens.ndim != 1:
        raise Error("INVALID_ARGUMENT", f"{name}: offsets and tokens must be 1-D")
    if offsets.size != rows + 1:
        raise Error("INVALID_ARGUMENT", f"{name} offsets has {offsets.size} values; expected "
                                        f"rows + 1 = {rows + 1}")
    return offsets, tokens, values


def _token_lists(value, name, rows, one_row):
    if isinstance(value, RowLists):
        return _csr(name, value, rows, False)[:2]
    items = _row_items(value, name, rows, one_row, _is_token_row)
    lists = [host_per_row(row, "int32", f"{name} of row {index}")
             for index, row in enumerate(items)]
    for index, row in enumerate(lists):
        if row.ndim != 1:
            raise Error("INVALID_ARGUMENT", f"{name} of row {index} must be a 1-D sequence "
                                            "of tokens")
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum([row.size for row in lists], out=offsets[1:])
    return offsets, np.concatenate(lists) if lists else np.empty(0, np.int32)


def _bias_lists(value, rows, one_row):
    name = "logit_bias"
    if isinstance(value, RowLists):
        return _csr(name, value, rows, True)
    if isinstance(value, dict):
        items = [value] * rows
    else:
        items = _row_items(value, name, rows, one_row, lambda row: isinstance(row, dict))
    tokens, values, offsets = [], [], [0]
    for index, row in enumerate(items):
        if row is None:
            row = {}
        if not isinstance(row, dict):
            raise Error("INVALID_ARGUMENT", f"logit_bias of row {index} must be a dict "
                                            f"{{token: bias}} or None; got {type(row).__name__}")
        tokens.extend(row.keys())
        values.extend(row.values())
        offsets.append(len(tokens))
    return (np.array(offsets, np.int64), host_per_row(tokens, "int32", "logit_bias tokens"),
            host_per_row(np.array(values, np.float64), "float32", "logit_bias values"))


def check_mask_shape(shape, is_bool, rows, vocab):
    """Error unless a mask of this shape (after a one-row mask gained its row
    dimension) has a row per output row, and a bool one a column per token."""
    if len(shape) != 2 or shape[0] != rows:
        raise Error("INVALID_ARGUMENT", f"allowed_mask must have one row per output row: "
                                        f"shape ({rows}, vocab) of bool or ({rows}, words) of "
                                        f"32-bit words; got shape {tuple(shape)}")
    if is_bool and shape[1] != vocab:
        raise Error("INVALID_ARGUMENT", f"allowed_mask (bool) has {shape[1]} columns; "
                                        f"expected the vocabulary ({vocab})")


def _mask(value, rows, vocab, one_row):
    array = np.asarray(value)
    if one_row and array.ndim == 1:
        array = array[np.newaxis]
    check_mask_shape(array.shape, array.dtype == np.bool_, rows, vocab)
    if array.dtype == np.bool_:
        words = -(-vocab // 32)
        packed = np.zeros((rows, words * 4), np.uint8)
        packed[:, :-(-vocab // 8)] = np.packbits(array, axis=1, bitorder="little")
        return np.ascontiguousarray(packed.view("<u4").astype(np.uint32))
    if array.dtype != np.uint32:
        raise Error("INVALID_ARGUMENT", f"allowed_mask must be bool (rows, vocab) or uint32 "
                                        f"(rows, words); got {array.dtype}")
    return np.ascontiguousarray(array)


def _penalty(value, name, rows):
    """(scalar, None) for a number, (the default, float32 array) per row."""
    if isinstance(value, (str, bytes)) or value is None:
        raise Error("INVALID_ARGUMENT", f"{name} must be a number or one value per row; "
                                        f"got {value!r}")
    if np.ndim(value) == 0:
        try:
            return float(value), None
        except (TypeError, ValueError):
            raise Error("INVALID_ARGUMENT", f"{name} must be a number or one value per row; "
                                            f"got {value!r}") from None
    array = host_per_row(value, "float32", name)
    if array.ndim != 1 or array.size != rows:
        raise Error("INVALID_ARGUMENT", f"{name} must be a number or 1-D with one value per "
                                        f"output row ({rows})")
    return _OFF[name], array


def processing_tuple(arguments, rows, vocab, one_row):
    """The extension's processing argument (python/src/core.cpp,
    Processing), or None when nothing is asked: host NumPy arrays in the
    order (allowed_mask, bias_offsets, bias_tokens, bias_values,
    history_offsets, history_tokens, prompt_offsets, prompt_tokens,
    repetition_penalty_per_row, frequency_penalty_per_row,
    presence_penalty_per_row, (repetition, frequency, presence)).
    rows: the output rows; one_row: the outputs have no row dimension."""
    if not given(arguments):
        return None
    arguments = {name: _host(arguments.get(name)) for name in NAMES if name in arguments}
    mask = arguments.get("allowed_mask")
    mask = None if mask is None else _mask(mask, rows, vocab, one_row)
    bias = arguments.get("logit_bias")
    bias = (None,) * 3 if bias is None else _bias_lists(bias, rows, one_row)
    lists = []
    for name in ("history", "prompt"):
        value = arguments.get(name)
        lists.extend((None, None) if value is None else _token_lists(value, name, rows, one_row))
    scalars, per_row = [], []
    for name, off in _OFF.items():
        scalar, array = _penalty(arguments.get(name, off), name, rows)
        scalars.append(scalar)
        per_row.append(array)
    return (mask,) + tuple(bias) + tuple(lists) + tuple(per_row) + (tuple(scalars),)

"""polysample.torch: the ops on CPU tensors (here and in CI when PyTorch is
installed) and on CUDA tensors (on a GPU machine): dtypes, identity with the
C library, stream ordering, CUDA-graph capture and replay (with device
offsets advanced inside the graph, and the workspace from the graph's
pool), request state, torch.compile."""
import json
import os
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

import polysample  # noqa: E402
import polysample.torch as pst  # noqa: E402

SETTING = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, seed=99, offset=3,
               num_samples=4)
SETTING_NO_SEED = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, num_samples=4)


def cuda_available():
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    entry = polysample.info()["backends"]["cuda"]
    return entry["available"], f"polysample's CUDA backend: {entry['reason']}"


_CUDA, _CUDA_REASON = cuda_available()
needs_cuda = pytest.mark.skipif(not _CUDA, reason=_CUDA_REASON)


def logits_tensor(rows=6, vocab=4000, dtype=torch.float32, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, vocab, generator=generator) * 2
    return values.to(dtype).to(device)


def numpy_reference(logits, **setting):
    """Tokens and logprobs from the CPU backend on the same values (bf16
    and f16 widen to f32 exactly)."""
    values = logits.detach().to("cpu", torch.float32).numpy()
    return polysample.sample(values, backend="cpu", return_logprobs=True, **setting)


# --- CPU tensors -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_tensors_equal_numpy(dtype):
    logits = logits_tensor(dtype=dtype)
    tokens, logprobs = pst.sample(logits, return_logprobs=True, **SETTING)
    assert isinstance(tokens, torch.Tensor) and tokens.dtype == torch.int32
    assert tokens.shape == logprobs.shape == (6, 4)
    expected_tokens, expected_logprobs = numpy_reference(logits, **SETTING)
    np.testing.assert_array_equal(tokens.numpy(), expected_tokens)
    np.testing.assert_array_equal(logprobs.numpy(), expected_logprobs)


def test_module_function_returns_torch_tensors():
    logits = logits_tensor()
    tokens = polysample.sample(logits, **SETTING)
    assert isinstance(tokens, torch.Tensor)
    np.testing.assert_array_equal(tokens.numpy(), pst.sample(logits, **SETTING).numpy())
    probs = polysample.probs(logits, top_k=50)
    assert isinstance(probs, torch.Tensor) and probs.dtype == torch.float32
    np.testing.assert_array_equal(probs.numpy(), pst.probs(logits, top_k=50).numpy())
    context = polysample.Context("cpu")
    np.testing.assert_array_equal(context.sample(logits, **SETTING).numpy(), tokens.numpy())


def test_per_row_tensors_and_large_seeds():
    logits = logits_tensor(rows=3)
    seeds = [2**64 - 1, 5, 2**63]
    tokens = pst.sample(logits, seed_per_row=seeds, top_k_per_row=torch.tensor([5, 10, 0]),
                        temperature_per_row=[0.5, 1.0, 2.0], num_samples=3)
    expected = polysample.sample(logits.numpy(), seed_per_row=seeds, top_k_per_row=[5, 10, 0],
                                 temperature_per_row=[0.5, 1.0, 2.0], num_samples=3)
    np.testing.assert_array_equal(tokens.numpy(), expected)
    high = pst.sample(logits, seed=2**64 - 1, offset=2**63)
    np.testing.assert_array_equal(high.numpy(), polysample.sample(logits.numpy(), seed=2**64 - 1,
                                                                  offset=2**63))


def test_request_state_tensors_equal_numpy():
    logits = logits_tensor(rows=4, vocab=3000)
    indices = torch.tensor([3, 3, 0, 1, 3], dtype=torch.int64)
    offsets = torch.tensor([5, 6, 7, 8, 2**63 - 1], dtype=torch.int64)
    streams = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    seeds = torch.full((5,), 42, dtype=torch.int64)
    arguments = dict(row_indices=indices, offset_per_row=offsets, subsequence_per_row=streams,
                     seed_per_row=seeds, num_samples=3)
    tokens = pst.sample(logits, **arguments)
    assert tokens.shape == (5, 3)
    expected = polysample.sample(logits.numpy(), **{name: value.numpy() for name, value in
                                                    arguments.items() if name != "num_samples"},
                                 num_samples=3)
    np.testing.assert_array_equal(tokens.numpy(), expected)
    by_tensor = pst.sample(logits, seed_tensor=torch.tensor([9]), offset_tensor=torch.tensor([4]))
    np.testing.assert_array_equal(by_tensor.numpy(), pst.sample(logits, seed=9, offset=4).numpy())
    probs = pst.probs(logits, row_indices=indices, top_k=30)
    assert probs.shape == (5, 3000)
    np.testing.assert_array_equal(probs.numpy(), polysample.probs(
        logits.numpy(), row_indices=indices.numpy(), top_k=30))


def test_context_workspace_size_and_workspace_on_cpu_tensors():
    context = polysample.Context("cpu")
    logits = logits_tensor()
    size = context.sample_workspace_size(logits, **SETTING)
    workspace = torch.zeros(size, dtype=torch.uint8)
    np.testing.assert_array_equal(context.sample(logits, workspace=workspace, **SETTING).numpy(),
                                  pst.sample(logits, **SETTING).numpy())
    with pytest.raises(polysample.Error, match="workspace_bytes"):
        context.sample(logits, workspace=workspace[:1], **SETTING)


def test_bad_tensor_arguments():
    with pytest.raises(polysample.Error, match="1-D or 2-D"):
        pst.sample(torch.zeros(2, 3, 4))
    with pytest.raises(polysample.Error, match="float32, float16 or bfloat16"):
        pst.sample(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(polysample.Error, match="top_p"):
        pst.sample(logits_tensor(), top_p=0.0)
    with pytest.raises(polysample.Error, match="one value per row"):
        pst.sample(logits_tensor(rows=3), seed_per_row=torch.tensor([1, 2]))
    with pytest.raises(polysample.Error, match="integers"):
        pst.sample(logits_tensor(rows=2), top_k_per_row=torch.tensor([1.5, 2.0]))
    with pytest.raises(polysample.Error, match="last dimension must be contiguous"):
        pst.sample(logits_tensor().t())


# The ops' arguments after the per-row arrays (sample: return_logprobs
# first): filter order, the 14 processing arguments (none), and for sample
# top-N (none).
NO_PROCESSING = (None,) * 11 + (1.0, 0.0, 0.0)
SAMPLE_TAIL = (0,) + NO_PROCESSING + (0, 0, False)
PROBS_TAIL = (0,) + NO_PROCESSING


def test_opcheck():
    logits = logits_tensor(rows=3, vocab=300)
    seeds = torch.tensor([1, 2, 3])
    torch.library.opcheck(torch.ops.polysample.sample.default,
                          (logits, 0.8, 20, 0.9, 0.0, 7, 1, 2, None, None, None, None, seeds,
                           None, None, None, None, None, True) + SAMPLE_TAIL)
    indices = torch.tensor([2, 0, 2, 1])
    torch.library.opcheck(torch.ops.polysample.sample.default,
                          (logits, 0.8, 20, 0.9, 0.0, 7, 1, 2, None, None, None, None, None,
                           torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 0, 1],
                                                                    dtype=torch.int32),
                           indices, None, None, True) + SAMPLE_TAIL)
    # Processing, an engine's order and top-N with ranks, as tensors.
    mask = torch.full((3, 10), -1, dtype=torch.int32)
    mask[1, 0] = 0x7ffffffe
    history = (torch.tensor([0, 2, 2, 5]), torch.tensor([4, 4, 7, 8, 9], dtype=torch.int32))
    bias = (torch.tensor([0, 1, 1, 2]), torch.tensor([3, 5], dtype=torch.int32),
            torch.tensor([2.5, -1.0]))
    processing = (mask,) + bias + history + (None, None, None, None, None, 1.3, 0.2, 0.1)
    torch.library.opcheck(torch.ops.polysample.sample.default,
                          (logits, 0.8, 20, 0.9, 0.0, 7, 1, 2) + (None,) * 10 +
                          (False, 1) + processing + (5, 0, True))
    torch.library.opcheck(torch.ops.polysample.probs.default,
                          (logits, 1.0, 20, 0.9, 0.0, None, None, None, None, None) + PROBS_TAIL)
    torch.library.opcheck(torch.ops.polysample.probs.default,
                          (logits, 1.0, 20, 0.9, 0.0, None, None, None, None, indices) +
                          PROBS_TAIL)
    torch.library.opcheck(torch.ops.polysample.probs.default,
                          (logits, 1.0, 20, 0.9, 0.05, None, None, None, None, None, 3) +
                          processing)


PROCESSING = dict(repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1)


def processing_forms(rows, vocab, generator):
    """Host forms of every processing argument, and the same as tensors."""
    mask = torch.rand(rows, vocab, generator=generator) < 0.7
    mask[:, 0] = True
    history = [list(range(row, row + 2 * row + 1)) for row in range(rows)]
    bias = [{1: 3.0, 7: -2.0}] + [{row: 1.5} for row in range(1, rows)]
    host = dict(allowed_mask=mask.numpy(), history=history, logit_bias=bias,
                prompt=[[9, 10]] * rows, **PROCESSING)
    offsets = np.cumsum([0] + [len(item) for item in history])
    bias_offsets = np.cumsum([0] + [len(item) for item in bias])
    tensors = dict(
        allowed_mask=mask,
        history=polysample.RowLists(torch.from_numpy(offsets),
                                    torch.tensor(sum(history, []), dtype=torch.int32)),
        logit_bias=polysample.RowLists(
            torch.from_numpy(bias_offsets),
            torch.tensor([token for item in bias for token in item], dtype=torch.int32),
            torch.tensor([value for item in bias for value in item.values()])),
        prompt=polysample.RowLists(torch.arange(0, 2 * rows + 1, 2),
                                   torch.tensor([9, 10] * rows, dtype=torch.int32)),
        repetition_penalty=torch.full((rows,), 1.3), frequency_penalty=0.2,
        presence_penalty=torch.full((rows,), 0.1))
    return host, tensors


def test_op_processing_top_logprobs_and_orders_equal_numpy():
    rows, vocab = 5, 700
    logits = logits_tensor(rows=rows, vocab=vocab, seed=3)
    host, tensors = processing_forms(rows, vocab, torch.Generator().manual_seed(5))
    setting = dict(temperature=0.9, top_k=40, top_p=0.8, min_p=0.02, seed=11, num_samples=3)
    for order in ("polysample", "vllm", "llama.cpp"):
        expected = polysample.sample(logits.numpy(), backend="cpu", top_logprobs=6,
                                     return_ranks=True, filter_order=order, **host, **setting)
        for forms in (host, tensors):
            result = pst.sample(logits, top_logprobs=6, return_ranks=True, filter_order=order,
                                **forms, **setting)
            assert isinstance(result, polysample.SampleResult)
            for name in result._fields:
                np.testing.assert_array_equal(getattr(result, name).numpy(),
                                              getattr(expected, name), err_msg=name)
        probs = pst.probs(logits, filter_order=order, **tensors, **setting_of_probs(setting))
        np.testing.assert_array_equal(probs.numpy(), polysample.probs(
            logits.numpy(), filter_order=order, **host, **setting_of_probs(setting)))
    raw = pst.sample(logits, top_logprobs=3, logprob_mode="raw", **setting)
    assert raw.ranks is None and raw.top_tokens.shape == (rows, 3)
    expected = polysample.sample(logits.numpy(), top_logprobs=3, logprob_mode="raw", **setting)
    np.testing.assert_array_equal(raw.top_logprobs.numpy(), expected.top_logprobs)
    # Without top-N the op's empty outputs do not reach the caller.
    tokens, logprobs = pst.sample(logits, return_logprobs=True, **tensors, **setting)
    np.testing.assert_array_equal(tokens.numpy(), polysample.sample(logits.numpy(), **host,
                                                                    **setting))


def setting_of_probs(setting):
    return {name: setting[name] for name in ("temperature", "top_k", "top_p", "min_p")}


def test_bool_mask_packs_on_the_device_as_on_the_host():
    from polysample import torch as module
    generator = torch.Generator().manual_seed(8)
    for vocab in (1, 31, 32, 33, 100):
        mask = torch.rand(3, vocab, generator=generator) < 0.5
        mask[:, -1] = True  # the top bit of a full last word: the int32 wrap
        packed = module._device_mask(mask, 3, vocab, False)
        from polysample._processing import _mask
        np.testing.assert_array_equal(packed.numpy().view(np.uint32), _mask(mask.numpy(), 3,
                                                                             vocab, False))


def test_bad_processing_tensors():
    logits = logits_tensor(rows=2, vocab=50)
    with pytest.raises(polysample.Error, match="allowed_mask .bool. has 40 columns"):
        pst.sample(logits, allowed_mask=torch.ones(2, 40, dtype=torch.bool))
    with pytest.raises(polysample.Error, match="one row per output row"):
        pst.sample(logits, allowed_mask=torch.ones(3, 50, dtype=torch.bool))
    with pytest.raises(polysample.Error, match="history offsets"):
        pst.sample(logits, history=polysample.RowLists(torch.tensor([0, 1]),
                                                       torch.tensor([3], dtype=torch.int32)))
    with pytest.raises(polysample.Error, match="offsets.2. is 5; the lists hold 1"):
        pst.sample(logits, history=polysample.RowLists(torch.tensor([0, 1, 5]),
                                                       torch.tensor([3], dtype=torch.int32)))
    with pytest.raises(polysample.Error, match="top_logprobs is 65"):
        pst.sample(logits, top_logprobs=65)
    with pytest.raises(ValueError, match="filter_order must be one of"):
        pst.sample(logits, filter_order="greedy")


def test_torch_compile_cpu_traces_the_op():
    logits = logits_tensor()

    def step(values):
        return pst.sample(values * 1.5, temperature=0.7, top_k=40, seed=4, num_samples=2)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    np.testing.assert_array_equal(compiled(logits).numpy(), step(logits).numpy())

    # With processing tensors (the bool mask packed inside the graph) and top-N.
    _, tensors = processing_forms(6, 4000, torch.Generator().manual_seed(2))

    def processed_step(values, mask, history, penalty):
        result = pst.sample(values, temperature=0.7, top_k=40, seed=4, num_samples=2,
                            allowed_mask=mask, history=history, repetition_penalty=penalty,
                            top_logprobs=4, return_ranks=True, filter_order="vllm")
        return result.tokens, result.top_tokens, result.ranks

    arguments = (logits, tensors["allowed_mask"], tensors["history"],
                 tensors["repetition_penalty"])
    compiled = torch.compile(processed_step, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(*arguments), processed_step(*arguments)):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())


# --- CUDA tensors ------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_tensors_equal_the_cpu_backend(dtype):
    logits = logits_tensor(rows=64, vocab=151_936, dtype=dtype, device="cuda")
    tokens, logprobs = pst.sample(logits, return_logprobs=True, **SETTING)
    assert tokens.device == logits.device and tokens.dtype == torch.int32
    expected_tokens, expected_logprobs = numpy_reference(logits, **SETTING)
    np.testing.assert_array_equal(tokens.cpu().numpy(), expected_tokens)
    # Logprobs are floats computed from exact integers: equal to rounding.
    np.testing.assert_allclose(logprobs.cpu().numpy(), expected_logprobs, rtol=2e-6, atol=1e-6)
    probs = pst.probs(logits, top_k=50, top_p=0.9)
    expected_probs = polysample.probs(logits.float().cpu().numpy(), top_k=50, top_p=0.9)
    np.testing.assert_array_equal(probs.cpu().numpy() > 0, expected_probs > 0)
    np.testing.assert_allclose(probs.cpu().numpy(), expected_probs, rtol=2e-6, atol=1e-12)


@needs_cuda
def test_cuda_row_strided_view():
    batch = torch.randn(8, 3, 32000, device="cuda")
    last = batch[:, -1, :]
    np.testing.assert_array_equal(pst.sample(last, **SETTING).cpu().numpy(),
                                  pst.sample(last.contiguous(), **SETTING).cpu().numpy())


@needs_cuda
def test_runs_in_order_on_a_non_default_stream():
    expected_values = logits_tensor(rows=32, vocab=32000, device="cuda")
    expected = numpy_reference(expected_values, **SETTING)[0]
    stream = torch.cuda.Stream()
    logits = torch.zeros_like(expected_values)
    with torch.cuda.stream(stream):
        # Work queued ahead keeps the stream busy, then writes the logits; a
        # sampler running elsewhere would read zeros, and the NaNs written
        # after it would make a late one return -1.
        heavy = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):
            heavy = heavy @ heavy / 64.0
        logits.copy_(expected_values)
        tokens = pst.sample(logits, **SETTING)
        logits.fill_(float("nan"))
    stream.synchronize()
    np.testing.assert_array_equal(tokens.cpu().numpy(), expected)


@needs_cuda
def test_cuda_graph_capture_and_replay():
    rows, vocab = 16, 32000
    static_logits = logits_tensor(rows, vocab, device="cuda")
    seeds = torch.arange(rows, dtype=torch.int64, device="cuda")
    setting = dict(temperature=0.9, top_k=100, top_p=0.95, num_samples=2)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pst.sample(static_logits, seed_per_row=seeds, **setting)  # warm-up
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_tokens = pst.sample(static_logits, seed_per_row=seeds, **setting)
    # A second capture at a larger shape must leave the first graph's
    # workspace alone.
    bigger = logits_tensor(4 * rows, 4 * vocab, device="cuda", seed=9)
    bigger_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(bigger_graph):
        bigger_tokens = pst.sample(bigger, seed=1, **setting)

    for step in range(3):
        fresh = logits_tensor(rows, vocab, device="cuda", seed=100 + step)
        static_logits.copy_(fresh)
        seeds.copy_(torch.arange(rows, device="cuda") * 1000 + step)
        graph.replay()
        bigger_graph.replay()
        torch.cuda.synchronize()
        expected = polysample.sample(fresh.cpu().numpy(), seed_per_row=seeds.cpu().numpy(),
                                     **setting)
        np.testing.assert_array_equal(static_tokens.cpu().numpy(), expected)
        np.testing.assert_array_equal(
            bigger_tokens.cpu().numpy(),
            polysample.sample(bigger.cpu().numpy(), seed=1, **setting))


def _advance(offsets):
    """The small kernel the captured step ends with: the next position."""
    offsets.add_(1)


@needs_cuda
def test_cuda_graph_with_device_offsets_draws_anew_at_each_replay():
    # One decode step captured once: sample with the positions in device
    # memory, then advance them inside the graph. Every replay must equal an
    # uncaptured call at that step's positions, and steps must differ.
    rows, vocab, steps = 8, 32000, 100
    logits = logits_tensor(rows, vocab, device="cuda", seed=3)
    seeds = torch.arange(100, 100 + rows, dtype=torch.int64, device="cuda")
    offsets = torch.zeros(rows, dtype=torch.int64, device="cuda")
    batch_offset = torch.zeros(1, dtype=torch.int64, device="cuda")
    setting = dict(temperature=1.0, top_k=1000, num_samples=2)

    def step():
        per_row = pst.sample(logits, seed_per_row=seeds, offset_per_row=offsets, **setting)
        shared = pst.sample(logits, seed=5, offset_tensor=batch_offset, **setting)
        _advance(offsets)
        _advance(batch_offset)
        return per_row, shared

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: contexts made outside the capture
    torch.cuda.current_stream().wait_stream(side)
    offsets.zero_()
    batch_offset.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_per_row, static_shared = step()
    offsets.zero_()
    batch_offset.zero_()

    host_logits = logits.cpu().numpy()
    previous = None
    changed = 0
    for position in range(steps):
        graph.replay()
        torch.cuda.synchronize()
        expected = polysample.sample(host_logits, seed_per_row=seeds.cpu().numpy(),
                                     offset_per_row=np.full(rows, position, np.uint64),
                                     **setting)
        np.testing.assert_array_equal(static_per_row.cpu().numpy(), expected,
                                      err_msg=f"step {position}")
        np.testing.assert_array_equal(static_shared.cpu().numpy(),
                                      polysample.sample(host_logits, seed=5, offset=position,
                                                        **setting), err_msg=f"step {position}")
        tokens = static_per_row.cpu().numpy()
        if previous is not None and (tokens != previous).any():
            changed += 1
        previous = tokens
    assert offsets.cpu().tolist() == [steps] * rows
    # 16 draws over top-1000 tokens: two steps agree by chance with
    # probability far below 1e-20, so every step differs from the last.
    assert changed == steps - 1


@needs_cuda
def test_cuda_graph_capture_at_a_new_shape_needs_no_library_allocation():
    # The op takes its workspace from torch's allocator (inside a capture:
    # the graph's pool), so capturing a shape far larger than any the
    # library has seen must not make it allocate: a cudaMalloc during a
    # capture in the default (global) mode would fail the capture.
    small = logits_tensor(2, 1000, device="cuda")
    pst.sample(small, seed=1)  # the context for this stream, made outside the capture
    torch.cuda.synchronize()
    logits = logits_tensor(256, 151_936, device="cuda", seed=4)
    offsets = torch.zeros(1, dtype=torch.int64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="global"):
        tokens = pst.sample(logits, seed=1, offset_tensor=offsets, num_samples=2)
    for value in (3, 9):
        offsets.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        np.testing.assert_array_equal(
            tokens.cpu().numpy(),
            polysample.sample(logits.cpu().numpy(), seed=1, offset=value, num_samples=2))


@needs_cuda
def test_cuda_request_state_equals_the_cpu_backend():
    logits = logits_tensor(rows=6, vocab=151_936, device="cuda")
    indices = torch.tensor([5, 5, 5, 0, 2], device="cuda")
    arguments = dict(row_indices=indices,
                     offset_per_row=torch.tensor([9, 9, 9, 1, 2**40], device="cuda"),
                     subsequence_per_row=torch.tensor([0, 1, 2, 0, 0], dtype=torch.int32,
                                                      device="cuda"),
                     seed_per_row=torch.full((5,), 77, device="cuda"))
    tokens, logprobs = pst.sample(logits, return_logprobs=True, **SETTING_NO_SEED, **arguments)
    host = {name: value.cpu().numpy() for name, value in arguments.items()}
    expected_tokens, expected_logprobs = polysample.sample(
        logits.cpu().numpy(), return_logprobs=True, **SETTING_NO_SEED, **host)
    np.testing.assert_array_equal(tokens.cpu().numpy(), expected_tokens)
    np.testing.assert_allclose(logprobs.cpu().numpy(), expected_logprobs, rtol=2e-6, atol=1e-6)


@needs_cuda
def test_cuda_processing_tensors_equal_the_cpu_backend():
    """Processing given as CUDA tensors (the bool mask packed on the GPU)
    reaches the CUDA backend as it is and draws the CPU backend's tokens;
    so do an engine's filter order and top-N logprobs with ranks."""
    rows, vocab = 5, 32000
    logits = logits_tensor(rows=rows, vocab=vocab, seed=4, device="cuda")
    host, tensors = processing_forms(rows, vocab, torch.Generator().manual_seed(6))
    on_device = {name: (polysample.RowLists(*(part.cuda() for part in value if part is not None))
                        if isinstance(value, polysample.RowLists)
                        else value.cuda() if isinstance(value, torch.Tensor) else value)
                 for name, value in tensors.items()}
    tokens, logprobs = pst.sample(logits, return_logprobs=True, **SETTING, **on_device)
    expected_tokens, expected_logprobs = polysample.sample(
        logits.cpu().numpy(), backend="cpu", return_logprobs=True, **SETTING, **host)
    np.testing.assert_array_equal(tokens.cpu().numpy(), expected_tokens)
    np.testing.assert_allclose(logprobs.cpu().numpy(), expected_logprobs, rtol=2e-6, atol=1e-6)
    # With an engine's order and top-N with ranks, both modes.
    for mode in ("processed", "raw"):
        result = pst.sample(logits, filter_order="vllm", top_logprobs=8, logprob_mode=mode,
                            return_ranks=True, **SETTING, **on_device)
        expected = polysample.sample(logits.cpu().numpy(), backend="cpu", filter_order="vllm",
                                     top_logprobs=8, logprob_mode=mode, return_ranks=True,
                                     **SETTING, **host)
        for name in ("tokens", "top_tokens", "ranks"):
            np.testing.assert_array_equal(getattr(result, name).cpu().numpy(),
                                          getattr(expected, name), err_msg=f"{mode} {name}")
        for name in ("logprobs", "top_logprobs"):
            np.testing.assert_allclose(getattr(result, name).cpu().numpy(),
                                       getattr(expected, name), rtol=2e-6, atol=1e-6,
                                       err_msg=f"{mode} {name}")


@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_cuda(mode):
    logits = logits_tensor(rows=8, vocab=32000, device="cuda")

    def step(values, seeds):
        return pst.sample(values / 0.7, top_k=40, top_p=0.9, seed_per_row=seeds, num_samples=2)

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    seeds = torch.arange(8, dtype=torch.int64, device="cuda")
    for _ in range(3):  # reduce-overhead records a graph after warm-up runs
        got = compiled(logits, seeds).clone()
    np.testing.assert_array_equal(got.cpu().numpy(), step(logits, seeds).cpu().numpy())


@needs_cuda
@pytest.mark.skipif(not os.environ.get("POLYSAMPLE_CLI"),
                    reason="POLYSAMPLE_CLI (path of the C `polysample` tool) is not set")
def test_cuda_tensors_equal_the_c_tool_on_cuda(tmp_path):
    logits = logits_tensor(rows=5, vocab=32000, device="cuda")
    path = tmp_path / "logits.npy"
    np.save(path, logits.cpu().numpy())
    command = [os.environ["POLYSAMPLE_CLI"], "sample", "--backend", "cuda", "--json",
               "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "99",
               "--offset", "3", "--num-samples", "4", str(path)]
    expected = json.loads(subprocess.run(command, capture_output=True, text=True,
                                         check=True).stdout)
    tokens = pst.sample(logits, temperature=0.8, top_k=50, top_p=0.9, seed=99, offset=3,
                        num_samples=4)
    assert tokens.cpu().tolist() == expected["tokens"]

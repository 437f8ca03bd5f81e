"""The torch ops' C++ kernels (polysample._torch_ops) against their Python
kernels (polysample.torch._sample_kernel, _probs_kernel): the same outputs
bit for bit, the same refusals with the same status and message, on CPU
tensors here and on CUDA tensors on a GPU machine. When the package was
built without the C++ kernels these tests skip, saying why; test_torch.py
then tests the Python kernels through the same ops.

Also the fast paths of the wrappers for scalar-only calls (polysample.sample
on NumPy arrays and tensors, polysample.torch.sample and probs): the same
results and errors as the general path."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

import polysample  # noqa: E402
import polysample.torch as pst  # noqa: E402

needs_cpp = pytest.mark.skipif(
    pst.KERNELS != "c++", reason=f"the torch ops run their Python kernels: {pst.KERNELS_REASON}")


def _cuda():
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    entry = polysample.info()["backends"]["cuda"]
    return entry["available"], f"polysample's CUDA backend: {entry['reason']}"


_CUDA, _CUDA_REASON = _cuda()
needs_cuda = pytest.mark.skipif(not _CUDA, reason=_CUDA_REASON)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

NO_ARRAYS = (None,) * 10
NO_PROCESSING = (None,) * 11 + (1.0, 0.0, 0.0)
NO_TOP = (0, 0, False)


def logits_of(rows, vocab, seed=0, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator) * 2).to(dtype).to(device)


def sample_arguments(logits, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, seed=7,
                     offset=3, num_samples=3, arrays=NO_ARRAYS, return_logprobs=True,
                     filter_order=0, processing=NO_PROCESSING, top=NO_TOP):
    return (logits, temperature, top_k, top_p, min_p, seed, offset, num_samples) + \
        tuple(arrays) + (return_logprobs, filter_order) + tuple(processing) + tuple(top)


def probs_arguments(logits, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01,
                    arrays=(None,) * 5, filter_order=0, processing=NO_PROCESSING):
    return (logits, temperature, top_k, top_p, min_p) + tuple(arrays) + (filter_order,) + \
        tuple(processing)


def assert_same_tensors(got, expected):
    got = got if isinstance(got, (tuple, list)) else (got,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, index
        # Bit for bit: NaN logprobs of bad rows compare equal as bits.
        assert torch.equal(a.cpu().view(torch.int32) if a.dtype == torch.float32 else a.cpu(),
                           b.cpu().view(torch.int32) if b.dtype == torch.float32 else b.cpu()), \
            index


def processing_tensors(rows, vocab, device, generator):
    words = -(-vocab // 32)
    mask = torch.randint(-2**31, 2**31 - 1, (rows, words), generator=generator,
                         dtype=torch.int64).to(torch.int32)
    mask[:, 0] |= 1  # token 0 allowed: no row is left empty
    history_lists = [list(range(row, row + 2 * row + 1)) for row in range(rows)]
    history = (torch.tensor(np.cumsum([0] + [len(item) for item in history_lists])),
               torch.tensor(sum(history_lists, []), dtype=torch.int32))
    bias = (torch.tensor([0] + [2] * rows).cumsum(0),
            torch.tensor([1, 7] * rows, dtype=torch.int32),
            torch.tensor([3.0, -2.0] * rows))
    prompt = (torch.arange(0, 2 * rows + 1, 2), torch.tensor([9, 10] * rows, dtype=torch.int32))
    penalty = torch.full((rows,), 1.3)
    presence = torch.linspace(-0.5, 0.5, rows)
    tensors = (mask,) + bias + history + prompt + (penalty, None, presence)
    return tuple(None if t is None else t.to(device) for t in tensors) + (1.0, 0.2, 0.0)


def sample_cases(device):
    """(name, op arguments) covering every argument of the sample op."""
    rows, vocab = 5, 700
    logits = logits_of(rows, vocab, device=device)
    on = dict(device=device)
    cases = [("plain", sample_arguments(logits)),
             ("greedy, one row", sample_arguments(logits[1], temperature=0.0, num_samples=1)),
             ("no logprobs", sample_arguments(logits, return_logprobs=False)),
             ("top-k only, large seed",
              sample_arguments(logits, top_p=1.0, min_p=0.0, seed=-5, offset=-(2**63)))]
    for dtype in (torch.float16, torch.bfloat16):
        cases.append((f"{dtype}", sample_arguments(logits.to(dtype))))
    wide = logits_of(rows, vocab + 100, seed=1, device=device)[:, :vocab]
    cases.append(("row-strided view", sample_arguments(wide)))
    arrays = (torch.linspace(0.5, 1.5, rows, **on), torch.tensor([5, 0, 10, 50, 1],
                                                                  dtype=torch.int32, **on),
              torch.full((rows,), 0.8, **on), torch.full((rows,), 0.02, **on),
              torch.tensor([1, -1, 2**62, 4, 5], **on), torch.arange(rows, **on) * 11,
              torch.tensor([0, 1, 2, 3, -1], dtype=torch.int32, **on), None, None, None)
    cases.append(("per-row arrays", sample_arguments(logits, arrays=arrays)))
    indices = torch.tensor([4, 4, 0, 2, 1, 3, 4], **on)
    gathered = (None,) * 4 + (torch.full((7,), 42, **on), torch.arange(7, **on),
                              torch.arange(7, dtype=torch.int32, **on), indices, None, None)
    cases.append(("row indices, request state", sample_arguments(logits, arrays=gathered)))
    pointers = (None,) * 8 + (torch.tensor([9], **on), torch.tensor([2**40], **on))
    cases.append(("seed and offset tensors", sample_arguments(logits, arrays=pointers)))
    generator = torch.Generator().manual_seed(4)
    processing = processing_tensors(rows, vocab, device, generator)
    cases.append(("processing", sample_arguments(logits, processing=processing)))
    cases.append(("penalty scalars only",
                  sample_arguments(logits, processing=(None,) * 11 + (1.2, 0.1, 0.3))))
    cases.append(("top-N with ranks", sample_arguments(logits, top=(6, 0, True))))
    cases.append(("top-N raw, no ranks", sample_arguments(logits, top=(4, 1, False))))
    processing_gathered = processing_tensors(7, vocab, device, generator)
    cases.append(("everything", sample_arguments(logits, arrays=gathered,
                                                 processing=processing_gathered,
                                                 top=(5, 0, True))))
    if device == "cpu":  # the engines' orders run on the CPU backend only
        for order in range(1, 6):
            cases.append((f"filter order {order}",
                          sample_arguments(logits, filter_order=order, processing=processing,
                                           top=(3, 0, True))))
    bad_row = logits.clone()
    bad_row[2, 5] = float("nan")
    cases.append(("a bad row", sample_arguments(bad_row, top=(3, 0, True))))
    return cases


def probs_cases(device):
    rows, vocab = 4, 500
    logits = logits_of(rows, vocab, seed=2, device=device)
    on = dict(device=device)
    generator = torch.Generator().manual_seed(5)
    cases = [("plain", probs_arguments(logits)),
             ("one row", probs_arguments(logits[0])),
             ("bfloat16", probs_arguments(logits.to(torch.bfloat16))),
             ("per-row", probs_arguments(logits, arrays=(
                 torch.linspace(0.5, 2.0, rows, **on), torch.tensor([0, 3, 30, 300],
                                                                    dtype=torch.int32, **on),
                 torch.full((rows,), 0.7, **on), torch.zeros(rows, **on), None))),
             ("row indices", probs_arguments(logits, arrays=(None,) * 4 + (
                 torch.tensor([3, 0, 0], **on),))),
             ("processing", probs_arguments(logits, processing=processing_tensors(
                 rows, vocab, device, generator)))]
    if device == "cpu":
        cases.append(("vllm order", probs_arguments(logits, filter_order=1)))
    return cases


@needs_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_sample_kernels_agree(device):
    for name, arguments in sample_cases(device):
        got = torch.ops.polysample.sample.default(*arguments)
        expected = pst._sample_kernel(*arguments)
        try:
            assert_same_tensors(got, expected)
        except AssertionError as error:
            raise AssertionError(f"case {name!r}: output {error}") from None


@needs_cpp
@pytest.mark.parametrize("device", DEVICES)
def test_probs_kernels_agree(device):
    for name, arguments in probs_cases(device):
        got = torch.ops.polysample.probs.default(*arguments)
        expected = pst._probs_kernel(*arguments)
        try:
            assert_same_tensors(got, expected)
        except AssertionError as error:
            raise AssertionError(f"case {name!r}: {error}") from None


@pytest.mark.parametrize("device", DEVICES)
def test_sample_scalars_equals_sample(device):
    logits = logits_of(3, 900, seed=6, device=device)
    for scalars in ((0.8, 40, 0.9, 0.01, 7, 3, 4, True, 0), (1.0, 0, 1.0, 0.0, -1, -2, 1, False, 0),
                    (0.0, 0, 1.0, 0.0, 0, 0, 2, True, 0)):
        got = torch.ops.polysample.sample_scalars.default(logits, *scalars)
        full = sample_arguments(logits, *scalars[:7], return_logprobs=scalars[7],
                                filter_order=scalars[8])
        assert_same_tensors(got, torch.ops.polysample.sample.default(*full)[:2])
        assert_same_tensors(got, pst._sample_scalars_kernel(logits, *scalars))


def refusal(call):
    """(status, message) of the polysample.Error a call raises."""
    with pytest.raises(polysample.Error) as caught:
        call()
    return caught.value.status, caught.value.message


def bad_sample_cases():
    logits = logits_of(3, 50)
    rows = dict(arrays=(torch.ones(2),) + (None,) * 9)
    cases = [
        ("3-D logits", sample_arguments(torch.zeros(2, 3, 4))),
        ("float64 logits", sample_arguments(torch.zeros(2, 4, dtype=torch.float64))),
        ("columns not contiguous", sample_arguments(logits.t())),
        ("overlapping rows", sample_arguments(logits[:1].expand(3, 50))),
        ("empty vocabulary", sample_arguments(torch.zeros(2, 0))),
        ("top_p 0 (the library's check)", sample_arguments(logits, top_p=0.0)),
        ("num_samples 0", sample_arguments(logits, num_samples=0)),
        ("top_k past int32", sample_arguments(logits, top_k=2**31)),
        ("per-row length", sample_arguments(logits, **rows)),
        ("per-row dtype", sample_arguments(logits, arrays=(None, torch.ones(3)) + (None,) * 8)),
        ("per-row 2-D", sample_arguments(logits, arrays=(torch.ones(3, 1, 1),) + (None,) * 9)),
        ("per-row strided", sample_arguments(logits, arrays=(torch.ones(6)[::2],) +
                                             (None,) * 9)),
        ("row_indices 2-D", sample_arguments(logits, arrays=(None,) * 7 + (
            torch.zeros(2, 2, dtype=torch.int64), None, None))),
        ("row_indices empty", sample_arguments(logits, arrays=(None,) * 7 + (
            torch.zeros(0, dtype=torch.int64), None, None))),
        ("row_indices int32", sample_arguments(logits, arrays=(None,) * 7 + (
            torch.zeros(2, dtype=torch.int32), None, None))),
        ("row index out of range", sample_arguments(logits, arrays=(None,) * 7 + (
            torch.tensor([0, 3]), None, None))),
        ("seed_tensor of two", sample_arguments(logits, arrays=(None,) * 8 + (
            torch.tensor([1, 2]), None))),
        ("mask shape", sample_arguments(logits, processing=(
            torch.zeros(2, 2, dtype=torch.int32),) + NO_PROCESSING[1:])),
        ("mask dtype", sample_arguments(logits, processing=(
            torch.zeros(3, 2, dtype=torch.int64),) + NO_PROCESSING[1:])),
        ("history offsets length", sample_arguments(logits, processing=(None,) * 4 + (
            torch.tensor([0, 1]), torch.tensor([3], dtype=torch.int32)) + NO_PROCESSING[6:])),
        ("history offsets past the tokens", sample_arguments(logits, processing=(None,) * 4 + (
            torch.tensor([0, 1, 1, 5]), torch.tensor([3], dtype=torch.int32)) +
            NO_PROCESSING[6:])),
        ("history tokens missing", sample_arguments(logits, processing=(None,) * 4 + (
            torch.tensor([0, 0, 0, 0]), None) + NO_PROCESSING[6:])),
        ("bias values length", sample_arguments(logits, processing=(None, torch.tensor(
            [0, 1, 1, 2]), torch.tensor([3, 4], dtype=torch.int32), torch.ones(1)) +
            NO_PROCESSING[4:])),
        ("penalty per row length", sample_arguments(logits, processing=(None,) * 8 + (
            torch.ones(2), None, None, 1.0, 0.0, 0.0))),
        ("repetition penalty range", sample_arguments(logits, processing=(None,) * 11 + (
            0.0, 0.0, 0.0))),
        ("logprob mode", sample_arguments(logits, top=(3, 7, False))),
        ("filter order", sample_arguments(logits, filter_order=99)),
    ]
    return cases


@needs_cpp
def test_kernels_refuse_alike():
    for name, arguments in bad_sample_cases():
        expected = refusal(lambda: pst._sample_kernel(*arguments))
        got = refusal(lambda: pst._call(torch.ops.polysample.sample.default, arguments))
        assert got == expected, name
    logits = logits_of(3, 50)
    for arguments in (probs_arguments(torch.zeros(3, 4, dtype=torch.int32)),
                      probs_arguments(logits, top_k=-1),
                      probs_arguments(logits, arrays=(None,) * 4 + (torch.tensor([[0]]),))):
        assert refusal(lambda: pst._call(torch.ops.polysample.probs.default, arguments)) == \
            refusal(lambda: pst._probs_kernel(*arguments))


@needs_cpp
def test_cpp_refusals_name_the_status_for_direct_callers():
    # Called through torch.ops, a C++ kernel's refusal is torch's
    # RuntimeError; its message starts with the status, which the wrappers
    # turn into polysample.Error.
    arguments = sample_arguments(logits_of(2, 10), top_p=0.0)
    with pytest.raises(RuntimeError, match=r"^polysample INVALID_PARAMETER: top_p"):
        torch.ops.polysample.sample.default(*arguments)
    # Refused before any output is made, with the wrappers' own message.
    with pytest.raises(polysample.Error, match="top_logprobs is 65"):
        pst._call(torch.ops.polysample.sample.default,
                  sample_arguments(logits_of(2, 10), top=(65, 0, False)))


def test_opcheck_sample_scalars():
    logits = logits_of(3, 300)
    torch.library.opcheck(torch.ops.polysample.sample_scalars.default,
                          (logits, 0.8, 20, 0.9, 0.0, 7, 1, 2, True, 0))
    torch.library.opcheck(torch.ops.polysample.sample_scalars.default,
                          (logits[0], 1.0, 0, 1.0, 0.0, -3, 0, 1, False, 1))


def test_kernels_are_reported():
    assert pst.KERNELS in ("c++", "python")
    assert (pst.KERNELS == "c++") == (pst.KERNELS_REASON is None)


@needs_cpp
def test_environment_asks_for_the_python_kernels():
    code = "import polysample.torch as p; print(p.KERNELS, '|', p.KERNELS_REASON)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, POLYSAMPLE_TORCH_OPS="0"), check=True)
    assert result.stdout.startswith("python | POLYSAMPLE_TORCH_OPS=0")


# --- the wrappers' fast paths ------------------------------------------------

def test_fast_paths_equal_the_general_path():
    # A NumPy integer for the seed is not a plain int: the general path.
    values = logits_of(4, 300, seed=9)
    host = values.numpy()
    for setting in (dict(), dict(temperature=0.7, top_k=30, top_p=0.9, min_p=0.01, offset=5,
                                 num_samples=3, return_logprobs=True),
                    dict(temperature=0, filter_order="vllm", return_logprobs=True),
                    dict(seed=2**64 - 1, offset=2**63, return_logprobs=True)):
        seed = setting.pop("seed", 3)
        general = polysample.sample(host, seed=np.uint64(seed), **setting)
        for logits in (host, values):
            for call in (polysample.sample, pst.sample):
                if call is pst.sample and logits is host:
                    continue
                got = call(logits, seed=seed, **setting)
                got = got if isinstance(got, tuple) else (got,)
                want = general if isinstance(general, tuple) else (general,)
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(np.asarray(a), b)
    probs = polysample.probs(host, top_k=np.int64(20))
    for logits in (host, values):
        np.testing.assert_array_equal(np.asarray(polysample.probs(logits, top_k=20)), probs)
    np.testing.assert_array_equal(pst.probs(values, top_k=20).numpy(), probs)


def test_fast_paths_refuse_as_before():
    host = logits_of(2, 20).numpy()
    tensor = torch.from_numpy(host)
    for logits in (host, tensor):
        for call in (polysample.sample, pst.sample) if logits is tensor else (polysample.sample,):
            assert refusal(lambda: call(logits, top_k=2**31))[0] == "INVALID_PARAMETER"
            assert refusal(lambda: call(logits, seed=-1))[0] == "INVALID_PARAMETER"
            assert refusal(lambda: call(logits, num_samples=0))[0] == "INVALID_PARAMETER"
            assert refusal(lambda: call(logits, top_p=0.0))[0] == "INVALID_PARAMETER"
            assert refusal(lambda: call(logits, top_k=1.5))[0] == "INVALID_ARGUMENT"
            with pytest.raises(ValueError, match="filter_order must be one of"):
                call(logits, filter_order="greedy")
        status, message = refusal(lambda: polysample.sample(logits[None]))
        assert status == "INVALID_ARGUMENT" and "1-D or 2-D" in message
        assert refusal(lambda: polysample.probs(logits, min_p=2.0))[0] == "INVALID_PARAMETER"


@needs_cuda
@needs_cpp
def test_cuda_graph_captures_the_scalar_op():
    # pst.sample with scalars only runs sample_scalars: captured, its
    # workspace comes from the graph's pool and its context is made during
    # the capture; replays equal eager calls.
    logits = logits_of(8, 32_000, seed=3, device="cuda")
    expected = pst.sample(logits, temperature=0.7, top_k=50, seed=11, num_samples=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):
            captured = pst.sample(logits, temperature=0.7, top_k=50, seed=11, num_samples=2)
    for _ in range(3):
        captured.fill_(-2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)

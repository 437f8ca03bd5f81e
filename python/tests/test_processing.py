"""Logit processing (docs/SAMPLING.md section 1): penalties, logit bias and
the allowed-token mask. A processed call must give exactly the tokens,
logprobs and probabilities of a plain call on logits processed here by the
contract's rules; every accepted form of an argument must mean the same;
bad input raises with its status. Every backend runs processing: a refusal
fails."""
import numpy as np
import pytest

import polysample
from polysample import RowLists

VOCAB = 1500
WORDS = (VOCAB + 31) // 32
TINY = np.float32(2.0**-64)


def read_logit(x):
    """The contract's read: magnitudes below 2^-64 (and -0) become +0."""
    return np.where(np.abs(x) < TINY, np.float32(0), x).astype(np.float32)


def penalty_reciprocal(r):
    """1/r as the contract computes it: four Newton steps in float32 from a
    bit-level guess (NumPy's float32 operations are correctly rounded)."""
    r = np.float32(r)
    guess = np.uint32(0x7EF311C3) - np.array(r).view(np.uint32)
    reciprocal = np.array(guess, np.uint32).view(np.float32)[()]
    for _ in range(4):
        error = np.float32(1) - r * reciprocal
        reciprocal = reciprocal + reciprocal * error
    return reciprocal


def process_literally(logits, history, prompt, bias, mask, repetition, frequency, presence):
    """Section 1's rules per row: penalties, bias in list order, mask, read."""
    out = np.empty_like(logits)
    for row in range(logits.shape[0]):
        x = read_logit(logits[row].copy())
        counts = np.bincount(np.asarray(history[row], np.int64), minlength=VOCAB)
        listed = (counts > 0) | np.isin(np.arange(VOCAB), prompt[row])
        r, f, p = (np.float32(v[row]) for v in (repetition, frequency, presence))
        for token in np.flatnonzero(listed):
            value = x[token]
            if r != 1:
                value = value * penalty_reciprocal(r) if value > 0 else value * r
            if counts[token]:
                value = value - f * np.float32(counts[token])
                value = value - p
            x[token] = value
        for token, value in bias[row].items():
            x[token] = x[token] + np.float32(value)
        x[~mask[row]] = -np.inf
        out[row] = read_logit(x)
    return out


def make_batch(rows, seed):
    """Logits, lists over a pool of 50 tokens (so they repeat and overlap), a
    mask allowing about 3 tokens in 4 (row 1: all), per-row penalties; a
    masked logit and a zero in every row, both in row 0's history."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(rows, VOCAB)).astype(np.float32)
    logits[:, 5] = -np.inf
    logits[:, 6] = 0
    pool = rng.choice(VOCAB, 50, replace=False)
    history = [list(rng.choice(pool, rng.integers(0, 40))) for _ in range(rows)]
    history[0] = [5, 6] + history[0]
    prompt = [rng.choice(pool, rng.integers(0, 20)) for _ in range(rows)]
    bias = [{int(token): float(rng.uniform(-4, 4))
             for token in rng.choice(pool, rng.integers(0, 25))} for _ in range(rows)]
    mask = rng.random((rows, VOCAB)) < 0.75
    mask[1:2] = True
    index = np.arange(rows)
    repetition = np.where(index % 3 == 0, 1, rng.uniform(0.5, 2, rows)).astype(np.float32)
    frequency = np.where(index % 4 == 1, 0, rng.uniform(-0.25, 0.75, rows)).astype(np.float32)
    presence = np.where(index % 4 == 2, 0, rng.uniform(-0.5, 1.5, rows)).astype(np.float32)
    return dict(logits=logits, history=history, prompt=prompt, bias=bias, mask=mask,
                repetition=repetition, frequency=frequency, presence=presence)


def arguments_of(batch):
    return dict(history=batch["history"], prompt=batch["prompt"], logit_bias=batch["bias"],
                allowed_mask=batch["mask"], repetition_penalty=batch["repetition"],
                frequency_penalty=batch["frequency"], presence_penalty=batch["presence"])


SETTINGS = [dict(temperature=0.9), dict(temperature=0.8, top_k=50, top_p=0.9),
            dict(temperature=0.7, min_p=0.05), dict(temperature=0.0)]


@pytest.mark.parametrize("setting", SETTINGS,
                         ids=lambda setting: ",".join(f"{k}={v}" for k, v in setting.items()))
def test_processing_equals_a_plain_call_on_the_processed_logits(context, setting):
    batch = make_batch(6, seed=1)
    processed = process_literally(batch["logits"], batch["history"], batch["prompt"],
                                  batch["bias"], batch["mask"], batch["repetition"],
                                  batch["frequency"], batch["presence"])
    sampling = dict(setting, seed=11, num_samples=16)
    tokens, logprobs = context.sample(
        batch["logits"], return_logprobs=True, **sampling, **arguments_of(batch))
    expected_tokens, expected_logprobs = context.sample(processed, return_logprobs=True,
                                                        **sampling)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(logprobs.view(np.uint32), expected_logprobs.view(np.uint32))
    probs = context.probs(batch["logits"], **setting, **arguments_of(batch))
    np.testing.assert_array_equal(probs.view(np.uint32),
                                  context.probs(processed, **setting).view(np.uint32))
    if setting["temperature"] > 0:
        assert (tokens != context.sample(batch["logits"], **sampling)).any(), \
            "processing changed no token"


def test_every_form_of_an_argument_means_the_same(context):
    batch = make_batch(4, seed=2)
    rows = 4
    offsets = lambda lists: np.concatenate([[0], np.cumsum([len(row) for row in lists])])
    flat = lambda lists: np.concatenate([np.asarray(row, np.int64) for row in lists])
    bias_offsets = offsets(batch["bias"])
    bias_tokens = [token for row in batch["bias"] for token in row]
    bias_values = [value for row in batch["bias"] for value in row.values()]
    packed = np.zeros((rows, WORDS + 3), np.uint32)  # rows wider than needed
    for row in range(rows):
        for token in np.flatnonzero(batch["mask"][row]):
            packed[row, token // 32] |= np.uint32(1 << (token % 32))
    as_lists = dict(history=batch["history"], prompt=[list(p) for p in batch["prompt"]],
                    logit_bias=batch["bias"], allowed_mask=batch["mask"],
                    repetition_penalty=1.3, frequency_penalty=0.25, presence_penalty=-0.5)
    as_csr = dict(history=RowLists(offsets(batch["history"]), flat(batch["history"])),
                  prompt=RowLists(offsets(batch["prompt"]), flat(batch["prompt"])),
                  logit_bias=RowLists(bias_offsets, bias_tokens, bias_values),
                  allowed_mask=packed, repetition_penalty=np.full(rows, 1.3, np.float32),
                  frequency_penalty=[0.25] * rows, presence_penalty=np.full(rows, -0.5))
    sampling = dict(seed=5, num_samples=20)
    expected = context.sample(batch["logits"], **sampling, **as_lists)
    np.testing.assert_array_equal(context.sample(batch["logits"], **sampling, **as_csr), expected)
    # One dict for every row equals the same dict in each row's place.
    shared = {3: 2.5, 700: -1.0}
    np.testing.assert_array_equal(
        context.sample(batch["logits"], logit_bias=shared, **sampling),
        context.sample(batch["logits"], logit_bias=[shared] * rows, **sampling))


def test_processing_follows_the_output_rows_of_a_row_gather(context):
    batch = make_batch(3, seed=3)
    indices = [2, 2, 0, 1]
    history = [[10, 10, 11], [], [6, 7], [1] * 30]
    arguments = dict(history=history, frequency_penalty=1.5, presence_penalty=0.5,
                     logit_bias=[{4: 3.0}, None, {}, {9: -2.0}], seed=3, num_samples=8)
    got = context.sample(batch["logits"], row_indices=indices, **arguments)
    copied = np.ascontiguousarray(batch["logits"][indices])
    np.testing.assert_array_equal(got, context.sample(copied, **arguments))


def test_one_dimensional_logits_take_one_rows_arguments(context):
    batch = make_batch(1, seed=4)
    one = dict(history=batch["history"][0], prompt=batch["prompt"][0],
               logit_bias=batch["bias"][0], allowed_mask=batch["mask"][0],
               repetition_penalty=1.7, seed=8, num_samples=10)
    got = context.sample(batch["logits"][0], **one)
    assert got.shape == (10,)
    rows = dict(one, history=batch["history"], prompt=batch["prompt"],
                logit_bias=batch["bias"], allowed_mask=batch["mask"])
    np.testing.assert_array_equal(got, context.sample(batch["logits"], **rows)[0])


def test_a_mask_that_allows_nothing_makes_a_bad_row():
    logits = make_batch(2, seed=5)["logits"]
    mask = np.ones((2, VOCAB), bool)
    mask[1] = False
    mask[0, 5] = False
    tokens, logprobs = polysample.sample(logits, allowed_mask=mask, num_samples=3,
                                         return_logprobs=True, backend="cpu")
    assert ((tokens[0] >= 0) & (tokens[0] != 5)).all()
    assert (tokens[1] == -1).all() and np.isnan(logprobs[1]).all()
    with pytest.raises(polysample.Error) as caught:
        polysample.Context("cpu", check_rows=True).sample(logits, allowed_mask=mask)
    assert caught.value.status == "BAD_ROW"


def test_the_workspace_size_counts_processing():
    context = polysample.Context("cpu")
    batch = make_batch(3, seed=6)
    arguments = dict(history=batch["history"], frequency_penalty=0.5, seed=2)
    size = context.sample_workspace_size(batch["logits"], **arguments)
    assert size >= context.sample_workspace_size(batch["logits"], seed=2)
    workspace = np.zeros(size, np.uint8)
    np.testing.assert_array_equal(
        context.sample(batch["logits"], workspace=workspace, **arguments),
        context.sample(batch["logits"], **arguments))


LOGITS = np.random.default_rng(7).normal(size=(2, 40)).astype(np.float32)


@pytest.mark.parametrize("arguments, status, fragment", [
    # The library's checks of the contents.
    (dict(history=[[1, 2], [3, 40]]), "INVALID_PARAMETER",
     "processing: row 1: history_tokens[3] is 40; the vocab is 40"),
    (dict(prompt=[[-1], []]), "INVALID_PARAMETER", "row 0: prompt_tokens[0] is -1"),
    (dict(logit_bias={3: float("inf")}), "INVALID_PARAMETER",
     "row 0: bias_values[0] is inf; expected finite"),
    (dict(history=RowLists([0, 2, 1], [1, 2])), "INVALID_ARGUMENT",
     "history_offsets[2] = 1 is below history_offsets[1] = 2"),
    (dict(repetition_penalty=0), "INVALID_PARAMETER",
     "processing: repetition_penalty is 0; expected 1e-3 .. 1e3 (1 = off)"),
    (dict(presence_penalty=[0, 2e3]), "INVALID_PARAMETER",
     "row 1: presence_penalty is 2000; expected -1e3 .. 1e3 (0 = off)"),
    (dict(frequency_penalty=float("nan")), "INVALID_PARAMETER", "frequency_penalty is nan"),
    (dict(allowed_mask=np.ones((2, 1), np.uint32)), "INVALID_ARGUMENT",
     "allowed_mask_words is 1; a row of 40 tokens needs 2"),
    # The package's checks of the forms and lengths.
    (dict(history=[[1, 2]]), "INVALID_ARGUMENT",
     "history has 1 rows; expected one per output row (2)"),
    (dict(history=[1, 2]), "INVALID_ARGUMENT", "history of row 0 must be an array"),
    (dict(history=[[0.5], []]), "INVALID_ARGUMENT", "history of row 0 must hold integers"),
    (dict(history=[[2**31], []]), "INVALID_PARAMETER", "history of row 0 holds 2147483648"),
    (dict(prompt="abc"), "INVALID_ARGUMENT", "prompt must be a list with one entry per output row"),
    (dict(history=RowLists([0, 2], [1, 2])), "INVALID_ARGUMENT",
     "history offsets has 2 values; expected rows + 1 = 3"),
    (dict(history=RowLists([0, 1, 3], [1, 2])), "INVALID_ARGUMENT",
     "history offsets[2] is 3; the lists hold 2 entries"),
    (dict(history=RowLists([0, 1, 2], [1, 2], [0.5, 0.5])), "INVALID_ARGUMENT", "take no values"),
    (dict(logit_bias=RowLists([0, 1, 2], [1, 2])), "INVALID_ARGUMENT", "needs values"),
    (dict(logit_bias=RowLists([0, 1, 2], [1, 2], [0.5])), "INVALID_ARGUMENT",
     "logit_bias has 2 tokens but 1 values"),
    (dict(logit_bias=[{1: 1.0}, [(2, 1.0)]]), "INVALID_ARGUMENT",
     "logit_bias of row 1 must be a dict {token: bias} or None"),
    (dict(logit_bias={"a": 1.0}), "INVALID_ARGUMENT", "logit_bias tokens must hold integers"),
    (dict(allowed_mask=np.ones((2, 39), bool)), "INVALID_ARGUMENT",
     "allowed_mask (bool) has 39 columns; expected the vocabulary (40)"),
    (dict(allowed_mask=np.ones((3, 40), bool)), "INVALID_ARGUMENT",
     "allowed_mask must have one row per output row"),
    (dict(allowed_mask=np.ones((2, 2), np.int64)), "INVALID_ARGUMENT",
     "allowed_mask must be bool (rows, vocab) or uint32 (rows, words)"),
    (dict(repetition_penalty=[1.0, 1.0, 1.0]), "INVALID_ARGUMENT",
     "repetition_penalty must be a number or 1-D with one value per output row (2)"),
    (dict(repetition_penalty="high"), "INVALID_ARGUMENT", "must be a number or one value per row"),
])
def test_bad_processing_raises_with_its_status(arguments, status, fragment):
    context = polysample.Context("cpu")
    with pytest.raises(polysample.Error) as caught:
        context.sample(LOGITS, **arguments)
    assert caught.value.status == status, caught.value
    assert fragment in caught.value.message, caught.value.message


def test_processing_through_torch_cpu_tensors():
    torch = pytest.importorskip("torch")
    batch = make_batch(3, seed=8)
    arguments = dict(history=[torch.tensor(row, dtype=torch.int64) for row in batch["history"]],
                     allowed_mask=torch.from_numpy(batch["mask"]),
                     presence_penalty=torch.tensor([0.5, 1.0, -1.0]), seed=4, num_samples=6)
    numpy_arguments = dict(arguments, history=batch["history"], allowed_mask=batch["mask"],
                           presence_penalty=[0.5, 1.0, -1.0])
    expected = polysample.sample(batch["logits"], **numpy_arguments)
    got = polysample.sample(torch.from_numpy(batch["logits"]), **arguments)
    np.testing.assert_array_equal(got.numpy(), expected)
    got = polysample.Context("cpu").sample(torch.from_numpy(batch["logits"]), **arguments)
    np.testing.assert_array_equal(got.numpy(), expected)

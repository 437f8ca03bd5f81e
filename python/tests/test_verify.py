"""Speculative decoding verification (docs/SAMPLING.md section 7):
polysample.verify and Context.verify. A draft equal to the target is
accepted whole; a draft token the target masks is never accepted; a greedy
tree takes the target's path; results equal the C tool's `sample --verify`
on the same .npy files; both target layouts and every input form mean the
same; bad inputs raise with the library's message; the first emitted token
follows the target at a fixed seed; every backend gives the CPU backend's
results bit for bit."""
import json
import os
import subprocess

import numpy as np
import pytest

import polysample

CLI = os.environ.get("POLYSAMPLE_CLI")
VOCAB = 50


def cpu_only(context):
    if context.backend != "cpu":
        pytest.skip(f"{context.backend}: torch CPU tensors are the CPU backend's")


def target_logits(requests, k, seed, vocab=VOCAB):
    """(requests, k + 1, vocab) float32 target logits."""
    return np.random.default_rng(seed).normal(0, 2, size=(requests, k + 1, vocab)) \
        .astype(np.float32)


def test_result_shapes_and_types(context):
    target = target_logits(3, 4, seed=1)
    drafts = np.zeros((3, 4), np.int32)
    result = context.verify(target, drafts, seed=5)
    assert isinstance(result, polysample.VerifyResult)
    assert result.accepted.shape == (3,) and result.accepted.dtype == np.int32
    for name in ("tokens", "path_nodes"):
        assert getattr(result, name).shape == (3, 5) and getattr(result, name).dtype == np.int32
    assert result.logprobs.shape == (3, 5) and result.logprobs.dtype == np.float32
    for r in range(3):
        emitted = result.accepted[r] + 1
        assert 0 <= result.accepted[r] <= 4
        assert result.path_nodes[r, :emitted].tolist() == list(range(emitted))  # a chain
        assert (result.tokens[r, emitted:] == -1).all()
        assert (result.path_nodes[r, emitted:] == -1).all()
        assert np.isnan(result.logprobs[r, emitted:]).all()
        assert (result.logprobs[r, :emitted] <= 0).all()


@pytest.mark.parametrize("setting", [dict(), dict(temperature=0.7, top_k=20, top_p=0.9),
                                     dict(temperature=1.3, min_p=0.05, filter_order="vllm")],
                         ids=["plain", "filters", "vllm-order"])
def test_a_draft_equal_to_the_target_is_accepted_whole(context, setting):
    """q = p at every node: the acceptance test holds for every u."""
    requests, k = 64, 5
    target = target_logits(requests, k, seed=2)
    # Chain node i was drawn from the target's row after node i - 1 (the
    # same logits and parameters), so its draft row is that target row.
    draft = np.ascontiguousarray(target[:, :k, :])
    tokens = np.empty((requests, k), np.int32)
    for i in range(k):
        tokens[:, i] = context.sample(draft[:, i, :], seed=100 + i, **setting)[:, 0]
    draft_setting = {f"draft_{key}": value for key, value in setting.items()}
    result = context.verify(target, tokens, draft_logits=draft, seed=9, **setting,
                            **draft_setting)
    assert (result.accepted == k).all()
    np.testing.assert_array_equal(result.tokens[:, :k], tokens)
    assert (result.path_nodes == np.arange(k + 1)).all()
    # The bonus token is drawn from the target's last row; its logprob is
    # that row's, as probs() gives it.
    probs = context.probs(target[:, k, :], **setting)
    bonus = result.tokens[:, k]
    assert (probs[np.arange(requests), bonus] > 0).all()
    np.testing.assert_allclose(result.logprobs[:, k],
                               np.log(probs[np.arange(requests), bonus]), rtol=1e-5)


def test_a_token_the_target_masks_is_never_accepted(context):
    requests, k = 400, 3
    target = target_logits(requests, k, seed=3, vocab=8)
    target *= 0.1
    target[:, 0, 2] = 3.0  # the root's draft token is likely: most requests reach node 2
    tokens = np.tile(np.array([[2, 5, 1]], np.int32), (requests, 1))
    target[:, 1, 5] = -np.inf  # after node 1, the target never draws node 2's token
    result = context.verify(target, tokens, seed_per_row=np.arange(requests, dtype=np.uint64))
    assert (result.accepted <= 1).all()
    after_node_1 = result.accepted == 1
    assert after_node_1.sum() > requests // 2, "too few requests reach node 2 to show anything"
    # The correction drawn at node 1 is not the masked token either.
    assert (result.tokens[after_node_1, 1] != 5).all()
    assert (result.path_nodes[after_node_1, :2] == [0, 1]).all()


def test_a_greedy_tree_follows_the_targets_argmax(context):
    """Root children: nodes 1 (token 4) and 2 (token 7); node 2's children:
    nodes 3 (token 0) and 4 (token 9); node 1's child: node 5 (token 3).
    The greedy target picks 7 at the root and 9 after node 2."""
    parents = np.array([[0, 0, 2, 2, 1]], np.int32)
    tokens = np.array([[4, 7, 0, 9, 3]], np.int32)
    target = np.zeros((1, 6, 12), np.float32)
    target[0, 0, 7] = 5.0   # at the root
    target[0, 1, 3] = 5.0   # after node 1 (not taken)
    target[0, 2, 9] = 5.0   # after node 2
    target[0, 4, 11] = 5.0  # after node 4: the bonus token
    result = context.verify(target, tokens, parents=parents, temperature=0.0)
    assert result.accepted.tolist() == [2]
    assert result.tokens.tolist() == [[7, 9, 11, -1, -1, -1]]
    assert result.path_nodes.tolist() == [[0, 2, 4, -1, -1, -1]]
    np.testing.assert_array_equal(result.logprobs[0, :3], [0.0, 0.0, 0.0])  # probability 1


def test_layouts_and_input_forms_mean_the_same(context):
    requests, k = 6, 3
    target = target_logits(requests, k, seed=4)
    draft = target_logits(requests, k - 1, seed=5)  # (requests, k, vocab)
    tokens = np.argmax(draft, axis=2).astype(np.int32)
    setting = dict(draft_logits=draft, draft_temperature=0.9, temperature=0.8, top_p=0.95,
                   seed=12, offset=3)
    expected = context.verify(target, tokens, **setting)
    flat = dict(setting, draft_logits=draft.reshape(requests * k, VOCAB))
    forms = [context.verify(target.reshape(requests * (k + 1), VOCAB), tokens, **flat),
             context.verify(target, tokens.tolist(), **setting),
             context.verify(target, tokens.astype(np.int64), **setting),
             polysample.verify(target, tokens, backend=context.backend, **setting)]
    # A view with padded rows: requests k + 1 rows apart, read in place.
    padded = np.zeros((requests, k + 1, VOCAB + 6), np.float32)
    padded[:, :, :VOCAB] = target
    forms.append(context.verify(padded[:, :, :VOCAB], tokens, **setting))
    for result in forms:
        for got, want in zip(result, expected):
            np.testing.assert_array_equal(got, want)


def test_per_request_arrays_equal_single_requests(context):
    requests, k = 4, 2
    target = target_logits(requests, k, seed=6)
    probs = np.random.default_rng(7).dirichlet(np.ones(VOCAB), size=(requests, k)) \
        .astype(np.float32)
    tokens = np.argmax(probs, axis=2).astype(np.int32)
    per_request = dict(temperature_per_row=[0.5, 1.0, 1.5, 0.0], top_k_per_row=[0, 10, 5, 0],
                       top_p_per_row=[1.0, 0.9, 0.8, 1.0], min_p_per_row=[0.0, 0.0, 0.1, 0.0],
                       seed_per_row=[1, 2**64 - 1, 77, 5], offset_per_row=[0, 4, 9, 2**40])
    together = context.verify(target, tokens, draft_probs=probs, **per_request)
    for r in range(requests):
        alone = context.verify(target[r:r + 1], tokens[r:r + 1], draft_probs=probs[r:r + 1],
                               **{name: values[r:r + 1] for name, values in per_request.items()})
        for got, want in zip(together, alone):
            np.testing.assert_array_equal(got[r], want[0])


def test_bad_requests_get_minus_one_or_raise_bad_row(context):
    target = target_logits(3, 2, seed=8)
    target[1, 2, 4] = np.nan  # request 1's last row: bad whether the walk reaches it or not
    tokens = np.zeros((3, 2), np.int32)
    result = context.verify(target, tokens, seed=1)
    assert result.accepted.tolist()[1] == -1
    assert (result.tokens[1] == -1).all() and (result.path_nodes[1] == -1).all()
    assert np.isnan(result.logprobs[1]).all()
    assert result.accepted[0] >= 0 and result.accepted[2] >= 0
    with pytest.raises(polysample.Error) as caught:
        polysample.verify(target, tokens, seed=1, check_rows=True, backend=context.backend)
    assert caught.value.status == "BAD_ROW"


def test_a_small_chain_follows_the_target_at_a_fixed_seed(context):
    """k = 1, vocab 4: the first emitted token (the accepted draft or the
    correction) is distributed as the target's row at the root, whatever the
    draft's q; and the acceptance rate is sum(min(p, q)). 20,000 requests,
    one stream each."""
    requests = 20000
    p_logits = np.array([1.0, 0.0, -0.5, 0.5], np.float32)
    q = np.array([0.1, 0.6, 0.2, 0.1], np.float32)
    target = np.tile(np.stack([p_logits, p_logits])[None], (requests, 1, 1))
    rng = np.random.default_rng(10)
    tokens = rng.choice(4, size=(requests, 1), p=q / q.sum()).astype(np.int32)
    result = context.verify(target, tokens, draft_probs=np.tile(q, (requests, 1, 1)),
                            seed_per_row=np.arange(requests, dtype=np.uint64))
    p = context.probs(p_logits).astype(np.float64)
    counts = np.bincount(result.tokens[:, 0], minlength=4)
    chi_square = (((counts - requests * p) ** 2) / (requests * p)).sum()
    assert chi_square < 16.27, (counts, requests * p)  # 3 degrees of freedom, the 0.1% level
    expected_rate = np.minimum(p, q).sum()
    spread = np.sqrt(expected_rate * (1 - expected_rate) / requests)
    assert abs(result.accepted.mean() - expected_rate) < 4 * spread


def run_cli(tmp_path, target, tokens, options, parents=None, draft_logits=None,
            draft_probs=None):
    np.save(tmp_path / "target.npy", target)
    np.save(tmp_path / "tokens.npy", tokens)
    command = [CLI, "sample", "--verify", "--backend", "cpu", "--json", "--logprobs",
               "--draft-tokens", str(tmp_path / "tokens.npy")]
    for name, array in (("parents", parents), ("logits", draft_logits),
                        ("probs", draft_probs)):
        if array is not None:
            np.save(tmp_path / f"{name}.npy", array)
            command += [f"--draft-{name}", str(tmp_path / f"{name}.npy")]
    command += options + [str(tmp_path / "target.npy")]
    return json.loads(subprocess.run(command, capture_output=True, text=True,
                                     check=True).stdout)


CLI_CASES = {
    "one-hot-chain": dict(k=4, options=dict(seed=3, temperature=0.9, top_p=0.9)),
    "logits-chain": dict(k=3, draft="logits",
                         options=dict(seed=2**64 - 1, offset=11, top_k=30,
                                      draft_temperature=0.7, draft_top_p=0.8)),
    "probs-tree": dict(k=5, draft="probs", parents=[0, 0, 1, 1, 2],
                       options=dict(seed=21, min_p=0.02)),
    "sglang-order": dict(k=2, draft="logits",
                         options=dict(seed=8, top_k=15, top_p=0.7, min_p=0.01,
                                      filter_order="sglang")),
}


@pytest.mark.skipif(not CLI, reason="POLYSAMPLE_CLI (path of the C `polysample` tool) is not "
                                    "set")
@pytest.mark.parametrize("case", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_results_equal_the_cli(context, tmp_path, case):
    requests, k = 12, case["k"]
    target = target_logits(requests, k, seed=13)
    rng = np.random.default_rng(14)
    arrays = {}
    # A draft near the target, so that the walks accept some nodes and
    # reject others: node i's draft row is the target's row at its parent
    # plus noise, and its token that row's argmax (one-hot drafts: the
    # target's, a quarter of them replaced by random tokens).
    parents = case.get("parents", list(range(k)))
    near = target[:, parents, :] + rng.normal(0, 1.0, size=(requests, k, VOCAB))
    near = near.astype(np.float32)
    tokens = np.argmax(near, axis=2).astype(np.int32)
    if case.get("draft") == "logits":
        arrays["draft_logits"] = near.reshape(requests * k, VOCAB)
    elif case.get("draft") == "probs":
        weights = np.exp(near - near.max(axis=2, keepdims=True))
        arrays["draft_probs"] = (weights / weights.sum(axis=2, keepdims=True)) \
            .reshape(requests * k, VOCAB).astype(np.float32)
    else:
        replaced = rng.random(size=(requests, k)) < 0.25
        tokens[replaced] = rng.integers(0, VOCAB, size=replaced.sum())
    if "parents" in case:
        arrays["parents"] = np.tile(np.array(case["parents"], np.int32), (requests, 1))
    target[5, 1, 3] = np.inf  # a bad request in both
    flat_target = target.reshape(requests * (k + 1), VOCAB)
    options = []
    for name, value in case["options"].items():
        flag = "--" + name.replace("_", "-")
        options += [flag, value if isinstance(value, str) else repr(value)]
    expected = run_cli(tmp_path, flat_target, tokens, options, **arrays)
    result = context.verify(target, tokens, **arrays, **case["options"])
    assert result.accepted.tolist() == expected["accepted"]
    assert result.accepted[5] == -1
    assert len(set(result.accepted.tolist()) - {-1}) >= 2, "the walks should differ"
    for r in range(requests):
        emitted = max(int(result.accepted[r]), 0) + 1  # a bad request prints one -1
        assert result.tokens[r, :emitted].tolist() == expected["tokens"][r]
        assert result.path_nodes[r, :emitted].tolist() == expected["path_nodes"][r]
        printed = np.array([np.nan if v is None else v for v in expected["logprobs"][r]],
                           dtype=np.float32)
        np.testing.assert_array_equal(result.logprobs[r, :emitted], printed)


def test_bad_drafts_raise_the_librarys_message(context):
    target = target_logits(2, 3, seed=15)
    tokens = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    draft = target_logits(2, 2, seed=16)
    cases = [
        (dict(draft_tokens=[[1, 2, 3], [4, VOCAB, 6]]), "INVALID_PARAMETER",
         f"request 1, draft node 2: token {VOCAB} is outside the vocab of {VOCAB}"),
        (dict(parents=[[0, 1, 3], [0, 0, 0]]), "INVALID_PARAMETER",
         "request 0, draft node 3: parent 3; a node's parent is an earlier node, "
         "0 (the root) .. 2"),
        (dict(draft_probs=np.full((2, 3, VOCAB), 1.5, np.float32)), "INVALID_PARAMETER",
         "request 0, draft node 1: draft_probs[0] is 1.5; expected a probability in [0, 1]"),
        (dict(draft_logits=draft, draft_top_k=-1), "INVALID_PARAMETER", None),
        (dict(draft_temperature=0.5), "INVALID_ARGUMENT",
         "drafts->draft_params without draft_logits: the parameters shape the draft logits' "
         "distribution"),
        (dict(draft_logits=draft, draft_probs=np.zeros((2, 3, VOCAB), np.float32)),
         "INVALID_ARGUMENT", "drafts has both draft_logits and draft_probs; give one (or "
                             "neither, for one-hot drafts)"),
        (dict(top_p=1.5), "INVALID_PARAMETER", None),
        (dict(draft_tokens=np.zeros((2, 65), np.int32), target_logits=target_logits(2, 65, 1)),
         "INVALID_PARAMETER", "drafts->nodes is 65; expected 1 .. 64 (PSM_MAX_DRAFT_NODES)"),
    ]
    for arguments, status, message in cases:
        call = dict(target_logits=target, draft_tokens=tokens)
        call.update(arguments)
        with pytest.raises(polysample.Error) as caught:
            context.verify(call.pop("target_logits"), call.pop("draft_tokens"), **call)
        assert caught.value.status == status, arguments
        if message is not None:
            assert caught.value.message == message
    # A draft token its draft distribution gives probability 0 could not
    # have been drawn.
    draft[0, 1, tokens[0, 1]] = -np.inf
    with pytest.raises(polysample.Error) as caught:
        context.verify(target, tokens, draft_logits=draft)
    assert caught.value.status == "INVALID_PARAMETER"
    assert caught.value.message.startswith("request 0, draft node 2")


def test_bad_shapes_and_forms_raise(context):
    target = target_logits(2, 3, seed=17)
    tokens = np.zeros((2, 3), np.int32)
    swapped = np.ascontiguousarray(target.transpose(1, 0, 2)).transpose(1, 0, 2)
    cases = [
        (target[:, :3], tokens, "target_logits has shape (2, 3, 50); draft_tokens' 2 requests"),
        (target.reshape(8, VOCAB)[:6], tokens, "target_logits has 6 rows"),
        (target, tokens[0], "draft_tokens must be 2-D (requests, k)"),
        (target, tokens.astype(np.float32), "draft_tokens must hold integers"),
        (target[None], tokens, "target_logits must be 3-D"),
        (swapped, tokens, "target_logits: its requests are not k + 1 rows apart"),
        (target.astype(np.int32), tokens, "target_logits must be float32, float16 or bfloat16"),
    ]
    for logits, drafts, message in cases:
        with pytest.raises(polysample.Error) as caught:
            context.verify(logits, drafts)
        assert caught.value.status == "INVALID_ARGUMENT"
        assert caught.value.message.startswith(message), caught.value.message
    with pytest.raises(polysample.Error) as caught:
        context.verify(target, tokens, parents=np.zeros((2, 2), np.int32))
    assert caught.value.message == "parents must have draft_tokens' shape (2, 3)"
    with pytest.raises(polysample.Error) as caught:
        context.verify(target, tokens, seed_per_row=[1, 2, 3])
    assert caught.value.message == "seed_per_row must be 1-D with one value per row (2)"
    with pytest.raises(ValueError):
        context.verify(target, tokens, filter_order="VLLM")


def test_every_backend_gives_the_cpu_backends_results(context):
    if context.backend == "cpu":
        pytest.skip("the CPU backend is the reference here")
    cpu = polysample.Context("cpu")
    rng = np.random.default_rng(18)
    target = target_logits(4, 3, seed=18)
    draft = target[:, :3, :] + rng.normal(0, 0.5, size=(4, 3, VOCAB)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, size=(4, 3)).astype(np.int32)
    for kwargs in ({"draft_logits": draft, "temperature": 0.9, "top_k": 20},
                   {"parents": np.array([[0, 0, 1]] * 4, np.int32), "draft_logits": draft,
                    "top_p": 0.9},
                   {"seed": 7}):
        expected = cpu.verify(target, tokens, **kwargs)
        result = context.verify(target, tokens, **kwargs)
        for got, want in zip(result, expected):
            np.testing.assert_array_equal(got, want)


def test_torch_cpu_tensors_give_torch_results(context):
    torch = pytest.importorskip("torch")
    cpu_only(context)
    target = target_logits(3, 2, seed=19)
    tokens = np.random.default_rng(20).integers(0, VOCAB, size=(3, 2)).astype(np.int32)
    expected = context.verify(target, tokens, seed=4, top_p=0.9)
    result = context.verify(torch.from_numpy(target), torch.from_numpy(tokens).long(), seed=4,
                            top_p=0.9)
    for got, want in zip(result, expected):
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), want)
    module = polysample.verify(torch.from_numpy(target), torch.from_numpy(tokens), seed=4,
                               top_p=0.9)
    for got, want in zip(module, expected):
        np.testing.assert_array_equal(got.numpy(), want)

"""filter_order (docs/SAMPLING.md section 4, "Filter orders") on sample,
probs, Context.sample/probs and the workspace sizes: each order's kept set
against a float64 reading of the section's table, tokens and logprobs
identical to the C tool's `sample --filter-order`, the names, and the
refusal of a backend without the orders (UNSUPPORTED with the library's
message)."""
import json
import os
import subprocess

import numpy as np
import pytest

import polysample
from reference import rank_order

ORDERS = ("polysample", "vllm", "sglang", "llama.cpp", "flashinfer_top_k_first",
          "flashinfer_joint")
# The command-line tool's names (cli/cli_util.c) of the same orders.
CLI_NAMES = dict(zip(ORDERS, ("polysample", "vllm", "sglang", "llama.cpp",
                              "flashinfer-top-k-first", "flashinfer-joint")))
CLI = os.environ.get("POLYSAMPLE_CLI")

# One row of 12 tokens with ties (tokens 1 and 2, 4 and 5) at the top-k and
# top-p boundaries of the settings below, where the orders disagree.
ROW = np.array([3.0, 2.0, 2.0, 1.25, 0.5, 0.5, -0.5, -1.0, -2.0, -3.0, -4.0, -6.0],
               dtype=np.float32)
SETTINGS = [dict(temperature=2.0, top_k=2, top_p=0.7, min_p=0.0),
            dict(temperature=1.5, top_k=5, top_p=0.85, min_p=0.2),
            dict(temperature=0.8, top_k=4, top_p=0.9, min_p=0.05),
            dict(temperature=3.0, top_k=0, top_p=0.8, min_p=0.3)]


def reference_kept(order, row, temperature, top_k, top_p, min_p):
    """The kept tokens of one row of finite logits under `order`, in float64
    (the table of SAMPLING.md section 4), and the smallest distance of a
    top-p or min-p test from its cutoff (the library's integer weights
    agree with float64 when it is well above the contract's 1e-6)."""
    row = np.asarray(row, dtype=np.float64)
    ranked = rank_order(row)
    scale = 1.0 if order == "llama.cpp" else np.float64(np.float32(temperature))
    weights = np.exp((row - row[ranked[0]]) / scale)  # the top token's weight is 1
    closest = [np.inf]

    def ties_kept(chosen):
        """chosen, with every token of the last chosen token's logit."""
        return [token for token in ranked if row[token] >= row[chosen[-1]]] if chosen else chosen

    def top_k_of(candidates, ties):
        if not 0 < top_k < len(candidates):
            return list(candidates)
        chosen = list(candidates[:top_k])
        return [t for t in candidates if t in ties_kept(chosen)] if ties else chosen

    def top_p_of(candidates, rule):
        """rule: "reach" (the shortest prefix reaching p of the mass),
        "exceed" (exceeding it) or "ties" (reaching it, ties kept)."""
        if top_p >= 1.0:
            return list(candidates)
        sums = np.cumsum(weights[candidates]) / weights[candidates].sum()
        cutoff = np.float64(np.float32(top_p))
        closest[0] = min(closest[0], np.min(np.abs(sums - cutoff)))
        length = int(np.argmax(sums > cutoff if rule == "exceed" else sums >= cutoff)) + 1
        chosen = list(candidates[:length])
        return [t for t in candidates if t in ties_kept(chosen)] if rule == "ties" else chosen

    def min_p_of(candidates, prefix=False):
        if min_p <= 0.0:
            return list(candidates)
        cutoff = np.float64(np.float32(min_p))
        closest[0] = min(closest[0], np.min(np.abs(weights[candidates] - cutoff)))
        passing = [t for t in candidates if weights[t] >= cutoff]
        if prefix:  # down to the last passing candidate in rank order
            return list(candidates[:list(candidates).index(passing[-1]) + 1])
        return passing

    valid = list(ranked)
    if order == "polysample":
        kept = min_p_of(top_p_of(top_k_of(valid, False), "reach"))
    elif order == "vllm":
        kept = top_p_of(top_k_of(min_p_of(valid), True), "reach")
    elif order == "sglang":
        kept = set(top_k_of(valid, False)) & set(top_p_of(valid, "exceed")) & \
            set(min_p_of(valid))
    elif order == "llama.cpp":
        kept = min_p_of(top_p_of(top_k_of(valid, False), "reach"), prefix=True)
    elif order == "flashinfer_top_k_first":
        kept = min_p_of(top_p_of(top_k_of(valid, True), "ties"))
    else:
        kept = set(top_k_of(valid, True)) & set(top_p_of(valid, "ties")) & set(min_p_of(valid))
    return set(int(token) for token in kept), closest[0]


def kept_by_library(context, setting, order):
    probs = context.probs(ROW, filter_order=order, **setting)
    return set(np.flatnonzero(probs > 0).tolist())


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}{v}"
                                                                      for k, v in s.items()))
def test_each_orders_kept_set_follows_the_table(context, setting):
    kept = {}
    for order in ORDERS:
        expected, closest = reference_kept(order, ROW, **setting)
        assert closest > 1e-4, f"{order}: a cutoff too close to a token for the float64 reading"
        kept[order] = kept_by_library(context, setting, order)
        assert kept[order] == expected, order
    # The settings are chosen so that the orders disagree: a test that
    # passed with one rule for every order would prove nothing.
    assert len({frozenset(tokens) for tokens in kept.values()}) >= 2


def test_the_settings_tell_every_order_apart():
    """Over the settings, no two orders keep the same sets (so each order's
    test above checks its own rule)."""
    signatures = {order: tuple(frozenset(reference_kept(order, ROW, **setting)[0])
                               for setting in SETTINGS) for order in ORDERS}
    assert len(set(signatures.values())) == len(ORDERS), signatures


def test_default_order_is_polysample(context):
    logits = np.random.default_rng(4).normal(0, 2, size=(5, 700)).astype(np.float32)
    setting = dict(temperature=0.9, top_k=30, top_p=0.8, min_p=0.02, seed=11, num_samples=6)
    np.testing.assert_array_equal(context.sample(logits, **setting),
                                  context.sample(logits, filter_order="polysample", **setting))
    np.testing.assert_array_equal(polysample.probs(logits, backend=context.backend, top_p=0.8),
                                  context.probs(logits, top_p=0.8, filter_order="polysample"))


def test_module_functions_and_cli_names_equal_context_methods(context):
    logits = np.random.default_rng(5).normal(0, 2, size=(3, 500)).astype(np.float32)
    setting = dict(temperature=1.3, top_k=40, top_p=0.85, min_p=0.03)
    for order in ORDERS:
        tokens = context.sample(logits, seed=2, num_samples=8, filter_order=order, **setting)
        for name in {order, CLI_NAMES[order]}:
            np.testing.assert_array_equal(
                polysample.sample(logits, seed=2, num_samples=8, filter_order=name,
                                  backend=context.backend, **setting), tokens)
            np.testing.assert_array_equal(
                polysample.probs(logits, filter_order=name, backend=context.backend, **setting),
                context.probs(logits, filter_order=order, **setting))


def test_workspace_sized_with_an_order_serves_that_order(context):
    if context.backend != "cpu":
        pytest.skip(f"a NumPy workspace is host memory; the {context.backend} backend's is "
                    "device memory (the torch ops pass CUDA workspaces from torch's allocator)")
    logits = np.random.default_rng(6).normal(0, 2, size=(4, 900)).astype(np.float32)
    setting = dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.01, filter_order="sglang")
    size = context.sample_workspace_size(logits, num_samples=3, **setting)
    workspace = np.empty(size, np.uint8)
    np.testing.assert_array_equal(
        context.sample(logits, num_samples=3, seed=9, workspace=workspace, **setting),
        context.sample(logits, num_samples=3, seed=9, **setting))
    size = context.probs_workspace_size(logits, **setting)
    np.testing.assert_array_equal(
        context.probs(logits, workspace=np.empty(size, np.uint8), **setting),
        context.probs(logits, **setting))


@pytest.mark.parametrize("name", ["vLLM", "llama_cpp", "flashinfer", "", None, 1])
def test_an_unknown_order_is_a_value_error_listing_the_names(context, name):
    logits = np.zeros((2, 10), np.float32)
    calls = [lambda: context.sample(logits, filter_order=name),
             lambda: context.probs(logits, filter_order=name),
             lambda: polysample.sample(logits, filter_order=name),
             lambda: polysample.probs(logits, filter_order=name),
             lambda: context.sample_workspace_size(logits, filter_order=name),
             lambda: context.probs_workspace_size(logits, filter_order=name)]
    for call in calls:
        with pytest.raises(ValueError) as caught:
            call()
        assert isinstance(caught.value, polysample.Error)
        assert caught.value.status == "INVALID_ARGUMENT"
        for order in ORDERS + tuple(CLI_NAMES.values()):
            assert order in caught.value.message
        assert repr(name) in caught.value.message


def test_every_backend_draws_the_cpu_tokens(context):
    """Tokens equal the CPU backend's, for every order, and so do the kept
    sets; probabilities agree to float rounding (docs/SAMPLING.md)."""
    if context.backend == "cpu":
        pytest.skip("the CPU backend is the reference here")
    cpu = polysample.Context("cpu")
    logits = np.random.default_rng(7).normal(0, 2, size=(4, 3000)).astype(np.float32)
    logits[1, ::7] = logits[1, 0]  # ties at the boundary for the orders that keep them
    setting = dict(temperature=0.9, top_k=40, top_p=0.8, min_p=0.02)
    for order in ORDERS:
        np.testing.assert_array_equal(
            context.sample(logits, seed=3, num_samples=16, filter_order=order, **setting),
            cpu.sample(logits, seed=3, num_samples=16, filter_order=order, **setting),
            err_msg=order)
        probs = context.probs(logits, filter_order=order, **setting)
        expected = cpu.probs(logits, filter_order=order, **setting)
        np.testing.assert_array_equal(probs > 0, expected > 0, err_msg=order)
        np.testing.assert_allclose(probs, expected, rtol=2e-6, atol=0, err_msg=order)


@pytest.mark.skipif(not CLI, reason="POLYSAMPLE_CLI (path of the C `polysample` tool) is not "
                                    "set")
@pytest.mark.parametrize("order", ORDERS)
def test_tokens_and_logprobs_equal_the_cli(context, tmp_path, order):
    setting = SETTINGS[1]
    path = tmp_path / "row.npy"
    np.save(path, ROW[None, :])
    command = [CLI, "sample", "--backend", "cpu", "--json", "--logprobs",
               "--filter-order", CLI_NAMES[order], "--temperature", repr(setting["temperature"]),
               "--top-k", str(setting["top_k"]), "--top-p", repr(setting["top_p"]),
               "--min-p", repr(setting["min_p"]), "--seed", "77", "--num-samples", "4000",
               str(path)]
    expected = json.loads(subprocess.run(command, capture_output=True, text=True,
                                         check=True).stdout)
    tokens, logprobs = context.sample(ROW[None, :], seed=77, num_samples=4000,
                                      return_logprobs=True, filter_order=order, **setting)
    assert tokens.tolist() == expected["tokens"]
    expected_logprobs = np.array(expected["logprobs"], dtype=np.float32)
    if context.backend == "cpu":
        np.testing.assert_array_equal(logprobs, expected_logprobs)
    else:  # another backend's logprobs agree to float rounding (docs/SAMPLING.md)
        np.testing.assert_allclose(logprobs, expected_logprobs, rtol=2e-6, atol=1e-6)
    # 4000 draws reach every kept token (the least probable has p > 0.01 here).
    assert set(tokens[0].tolist()) == kept_by_library(context, setting, order)

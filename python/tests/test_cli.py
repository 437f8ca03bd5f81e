"""Tokens and logprobs identical to the C command-line tool on the same
.npy file. POLYSAMPLE_CLI names the `polysample` binary (run-tests.sh and
gpu-tests.sh set it from the build directory); without it these tests skip."""
import json
import os
import subprocess

import numpy as np
import pytest

CLI = os.environ.get("POLYSAMPLE_CLI")
pytestmark = pytest.mark.skipif(not CLI, reason="POLYSAMPLE_CLI (path of the C `polysample` "
                                                "tool) is not set")

CASES = [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0, num_samples=1),
    dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.0, seed=1234, offset=7, num_samples=4),
    dict(temperature=1.2, top_k=0, top_p=0.95, min_p=0.05, seed=2**64 - 1, offset=2**40,
         num_samples=2),
    dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=5, offset=0, num_samples=2),
]


def run_cli(path, backend, case):
    command = [CLI, "sample", "--backend", backend, "--json", "--logprobs",
               "--temperature", repr(case["temperature"]), "--top-k", str(case["top_k"]),
               "--top-p", repr(case["top_p"]), "--min-p", repr(case["min_p"]),
               "--seed", str(case["seed"]), "--offset", str(case["offset"]),
               "--num-samples", str(case["num_samples"]), str(path)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c['temperature']}-k{c['top_k']}-"
                                                      f"p{c['top_p']}-m{c['min_p']}")
def test_tokens_and_logprobs_equal_the_cli(context, tmp_path, dtype, case):
    logits = np.random.default_rng(8).normal(0, 2, size=(7, 5000)).astype(dtype)
    logits[3, 17] = np.nan  # a bad row: -1 and NaN in both
    path = tmp_path / "logits.npy"
    np.save(path, logits)
    expected = run_cli(path, context.backend, case)
    tokens, logprobs = context.sample(logits, return_logprobs=True, **case)
    assert tokens.tolist() == expected["tokens"]
    # The tool prints logprobs with 9 significant digits (exact for float32)
    # and NaN as null.
    printed = np.array([[np.nan if v is None else v for v in row] for row in expected["logprobs"]],
                       dtype=np.float32)
    np.testing.assert_array_equal(logprobs, printed)

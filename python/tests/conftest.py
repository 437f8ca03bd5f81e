"""Shared fixtures: the backends under test and the float64 reference.

POLYSAMPLE_TEST_BACKENDS (a comma list, default "cpu") picks the backends
the NumPy tests run on, as for the C suite; a listed backend that is not
available here skips with the library's reason.
"""
import os

import pytest

import polysample


def _backends():
    listed = os.environ.get("POLYSAMPLE_TEST_BACKENDS", "cpu")
    return [name.strip() for name in listed.split(",") if name.strip()]


@pytest.fixture(params=_backends(), scope="session")
def context(request):
    backends = polysample.info()["backends"]
    entry = backends.get(request.param)
    if entry is None:
        pytest.fail(f"POLYSAMPLE_TEST_BACKENDS names an unknown backend {request.param!r}")
    if not entry["available"]:
        pytest.skip(f"{request.param} backend not available: {entry['reason']}")
    return polysample.Context(request.param)

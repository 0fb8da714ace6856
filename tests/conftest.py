"""Shared test configuration: a deterministic hypothesis profile and small tree helpers."""

from __future__ import annotations

import os

import optree
import pytest
import torch
from hypothesis import HealthCheck, settings

# Derandomized: the same examples on every run, so a failure reproduces. `max_examples` is set
# per test where a property needs more than the default.
settings.register_profile(
    "funcdp",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "funcdp"))


def assert_trees_close(actual, expected, *, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Asserts two trees have the same structure and leaf-wise close tensors."""
    leaves_a, spec_a = optree.tree_flatten(actual)
    leaves_e, spec_e = optree.tree_flatten(expected)
    assert spec_a == spec_e, f"tree structures differ: {spec_a} vs {spec_e}"
    for a, e in zip(leaves_a, leaves_e, strict=True):
        if not isinstance(a, torch.Tensor):
            assert a == e, f"leaves differ: {a!r} vs {e!r}"
            continue
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def assert_trees_equal(actual, expected) -> None:
    """Asserts two trees have the same structure and bit-identical tensors (NaN equal NaN)."""
    leaves_a, spec_a = optree.tree_flatten(actual)
    leaves_e, spec_e = optree.tree_flatten(expected)
    assert spec_a == spec_e, f"tree structures differ: {spec_a} vs {spec_e}"
    for a, e in zip(leaves_a, leaves_e, strict=True):
        if not isinstance(a, torch.Tensor):
            assert a == e, f"leaves differ: {a!r} vs {e!r}"
            continue
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


@pytest.fixture(scope="session")
def trees_close():
    """The `assert_trees_close` helper, for tests that prefer a fixture to an import."""
    return assert_trees_close


@pytest.fixture(scope="session")
def trees_equal():
    """The `assert_trees_equal` helper."""
    return assert_trees_equal

"""Tests for funcdp/tree.py: norms against a flattened reference, and the leaf-wise helpers."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from funcdp import tree as fdt


def _tree(batch: int | None = None, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    return {
        "w": torch.randn(*lead, 3, 4, generator=gen),
        "b": torch.randn(*lead, 4, generator=gen),
        "nested": (
            torch.randn(*lead, 2, 2, 2, generator=gen),
            [torch.randn(*lead, 1, generator=gen)],
        ),
    }


def _flat(tree) -> torch.Tensor:
    return torch.cat([x.double().reshape(-1) for x in fdt.tree_leaves(tree)])


def test_global_norm_equals_norm_of_flattened_leaves():
    tree = _tree()
    expected = _flat(tree).norm()
    assert fdt.global_norm(tree).item() == pytest.approx(expected.item(), rel=1e-6)


def test_global_norm_of_empty_tree_is_zero():
    assert fdt.global_norm({}).item() == 0.0


def test_global_norm_upcasts_half_precision():
    # 300^2 * 4 = 360000 overflows float16 (max 65504); the norm must still be 600.
    tree = {"a": torch.full((4,), 300.0, dtype=torch.float16)}
    norm = fdt.global_norm(tree)
    assert math.isfinite(norm.item())
    assert norm.item() == pytest.approx(600.0)


@given(batch=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_per_example_norms_match_flattened_rows(batch, seed):
    tree = _tree(batch, seed)
    rows = torch.cat([x.double().reshape(batch, -1) for x in fdt.tree_leaves(tree)], dim=1)
    norms = fdt.per_example_norms(tree)
    assert norms.shape == (batch,)
    torch.testing.assert_close(norms.double(), rows.norm(dim=1), rtol=1e-6, atol=0)


def test_per_example_norms_of_zero_rows_are_zero():
    tree = {"a": torch.zeros(3, 5), "b": torch.zeros(3)}
    assert torch.equal(fdt.per_example_norms(tree), torch.zeros(3))


def test_per_example_norms_refuses_empty_tree():
    with pytest.raises(ValueError, match="at least one leaf"):
        fdt.per_example_norms({})


def test_batch_size_of_refuses_mismatched_leading_dimensions():
    assert fdt.batch_size_of({"a": torch.zeros(3, 2), "b": torch.zeros(3)}) == 3
    with pytest.raises(ValueError, match=r"leading dimension.*\[2, 3\]"):
        fdt.batch_size_of({"a": torch.zeros(3, 2), "b": torch.zeros(2)})


def test_tree_add_scale_zeros_like(trees_equal):
    a, b = _tree(seed=1), _tree(seed=2)
    total = fdt.tree_add(a, b)
    trees_equal(total, fdt.tree_map(lambda x, y: x + y, a, b))
    trees_equal(fdt.tree_scale(a, 2.5), fdt.tree_map(lambda x: x * 2.5, a))
    trees_equal(fdt.tree_scale(a, torch.tensor(-1.0)), fdt.tree_map(torch.neg, a))
    zeros = fdt.tree_zeros_like(a)
    trees_equal(zeros, fdt.tree_map(lambda x: torch.zeros(x.shape, dtype=x.dtype), a))
    # The inputs are not modified.
    trees_equal(a, _tree(seed=1))


def test_tree_add_refuses_different_structures():
    with pytest.raises(ValueError):
        fdt.tree_add({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_tree_clone_shares_no_storage(trees_equal):
    tree = {**_tree(), "step": 3, "name": "x"}
    copy = fdt.tree_clone(tree)
    trees_equal(copy, tree)
    for original, cloned in zip(fdt.tree_leaves(tree), fdt.tree_leaves(copy), strict=True):
        if isinstance(original, torch.Tensor):
            assert cloned.data_ptr() != original.data_ptr()
    copy["w"].add_(1.0)
    assert not torch.equal(copy["w"], tree["w"])


def test_flatten_unflatten_round_trip(trees_equal):
    tree = _tree()
    leaves, spec = fdt.tree_flatten(tree)
    assert len(leaves) == 4
    trees_equal(fdt.tree_unflatten(spec, leaves), tree)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_is_isfinite(dtype):
    info = torch.finfo(dtype)
    special = [0.0, -0.0, 1.0, info.max, -info.max, info.tiny, info.tiny / 4]
    special += [float("inf"), -float("inf"), float("nan")]
    x = torch.cat([torch.tensor(special, dtype=dtype), torch.randn(1000, dtype=dtype) * 1e3])
    assert torch.equal(fdt.finite(x), torch.isfinite(x))
    assert fdt.finite(x).tolist()[: len(special)] == [True] * 7 + [False] * 3

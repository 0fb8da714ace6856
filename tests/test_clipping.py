"""Tests for funcdp/transforms/clipping.py: flat per-example clipping to L2 norm C."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import funcdp as fdp
from funcdp.transforms import PER_EXAMPLE

LEAF_SHAPES = [(), (3,), (2, 2), (1, 3, 2), (5,)]
# float32 squares overflow above ~1.8e19, where per_example_norms returns inf (a known limit).
MAX_EXPONENT = 15


@st.composite
def per_example_trees(draw):
    """A dict of [B, ...] float32 leaves, each example at its own magnitude, with exact zeros."""
    batch = draw(st.integers(1, 16))
    shapes = draw(st.lists(st.sampled_from(LEAF_SHAPES), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Per-example magnitude from tiny to huge; some examples all zero, some coordinates zero.
    exponents = draw(st.lists(st.integers(-30, MAX_EXPONENT), min_size=batch, max_size=batch))
    scales = np.array([10.0**e for e in exponents])
    zero_rows = rng.random(batch) < 0.15
    tree = {}
    for i, shape in enumerate(shapes):
        values = rng.standard_normal((batch, *shape)) * scales.reshape((-1,) + (1,) * len(shape))
        values[rng.random(values.shape) < 0.2] = 0.0
        values[zero_rows] = 0.0
        tree[f"leaf{i}"] = torch.from_numpy(values).float()
    return tree


def _rows(tree) -> torch.Tensor:
    leaves = fdp.tree.tree_leaves(tree)
    return torch.cat([x.double().reshape(x.shape[0], -1) for x in leaves], dim=1)


@settings(max_examples=250)
@given(tree=per_example_trees(), max_norm=st.sampled_from([1e-3, 0.1, 1.0, 7.5, 1e4]))
def test_clip_bounds_norm_and_keeps_direction(tree, max_norm):
    transform = fdp.clip(max_norm)
    clipped, state = transform.update(tree, transform.init(None))
    assert state == ()
    assert list(clipped) == list(tree)
    before, after = _rows(tree), _rows(clipped)
    norms_before, norms_after = before.norm(dim=1), after.norm(dim=1)
    # Every clipped example is within C (up to float32 rounding).
    assert (norms_after <= max_norm * (1 + 1e-6)).all(), (norms_after, max_norm)
    for i in range(before.shape[0]):
        if norms_before[i] <= max_norm:
            # Already within C: untouched, bit for bit.
            assert torch.equal(after[i], before[i])
        else:
            # Over C: scaled to exactly C along the same direction.
            assert norms_after[i].item() == pytest.approx(max_norm, rel=1e-5)
            expected = before[i] * (max_norm / norms_before[i])
            torch.testing.assert_close(after[i], expected, rtol=1e-5, atol=max_norm * 1e-6)
    for name, leaf in clipped.items():
        assert leaf.dtype == tree[name].dtype and leaf.shape == tree[name].shape


def test_clip_plain_example():
    tree = {"a": torch.tensor([[3.0, 0.0], [0.3, 0.0]]), "b": torch.tensor([[4.0], [0.4]])}
    clipped, _ = fdp.clip(1.0).update(tree, ())
    torch.testing.assert_close(clipped["a"], torch.tensor([[0.6, 0.0], [0.3, 0.0]]))
    torch.testing.assert_close(clipped["b"], torch.tensor([[0.8], [0.4]]))


def test_clip_handles_mixed_dtypes():
    tree = {
        "a": torch.full((2, 3), 10.0, dtype=torch.float64),
        "b": torch.full((2, 1), 10.0).half(),
    }
    clipped, _ = fdp.clip(1.0).update(tree, ())
    assert clipped["a"].dtype == torch.float64 and clipped["b"].dtype == torch.float16
    norms = _rows(clipped).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(2, dtype=torch.float64), rtol=1e-3, atol=0)


def test_clip_declares_sensitivity_and_stage():
    transform = fdp.clip(2.5)
    assert transform.sensitivity == 2.5
    assert transform.stage == PER_EXAMPLE
    assert fdp.chain(fdp.clip(2.5), fdp.aggregate()).sensitivity == 2.5
    assert isinstance(fdp.clip(3).sensitivity, float)


@pytest.mark.parametrize(
    "max_norm", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, True, False, "1", None]
)
def test_bad_max_norm_raises(max_norm):
    with pytest.raises(ValueError, match=r"max_norm must be a finite number > 0, got"):
        fdp.clip(max_norm)

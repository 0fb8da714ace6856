"""Tests for funcdp/transforms/aggregation.py: the masked sum over the real examples."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import funcdp as fdp
from funcdp.transforms import REDUCE

LEAF_SHAPES = [(), (3,), (2, 2), (1, 2, 3)]
POISON = [np.nan, np.inf, -np.inf, 3e38, -3e38]


@st.composite
def padded_batches(draw):
    """A per-example tree, a mask, and the same tree with its padded rows poisoned."""
    batch = draw(st.integers(1, 16))
    shapes = draw(st.lists(st.sampled_from(LEAF_SHAPES), min_size=1, max_size=3))
    mask = np.array(draw(st.lists(st.booleans(), min_size=batch, max_size=batch)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    clean, poisoned = {}, {}
    for i, shape in enumerate(shapes):
        values = rng.standard_normal((batch, *shape))
        bad = values.copy()
        bad[~mask] = rng.choice(POISON, size=bad[~mask].shape)
        values[~mask] = 0.0
        clean[f"leaf{i}"] = torch.from_numpy(values).to(dtype)
        poisoned[f"leaf{i}"] = torch.from_numpy(bad).to(dtype)
    return clean, poisoned, torch.from_numpy(mask)


@settings(max_examples=200)
@given(data=padded_batches())
def test_padded_rows_contribute_exactly_zero(data, trees_equal, trees_close):
    clean, poisoned, mask = data
    transform = fdp.aggregate()
    summed, state = transform.update(poisoned, transform.init(None), mask=mask)
    assert state == ()
    # Bit-identical to the sum where the padded rows hold zeros: no NaN or inf leaks through.
    trees_equal(summed, transform.update(clean, (), mask=mask)[0])
    # And equal to the sum over the real rows alone.
    expected = {k: v[mask].sum(0) for k, v in clean.items()}
    trees_close(summed, expected, rtol=1e-6, atol=1e-6)
    for name, leaf in summed.items():
        assert leaf.shape == clean[name].shape[1:] and leaf.dtype == clean[name].dtype


def test_no_mask_sums_every_row():
    tree = {"a": torch.arange(12.0).reshape(4, 3), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    summed, _ = fdp.aggregate().update(tree, ())
    assert torch.equal(summed["a"], torch.tensor([18.0, 22.0, 26.0]))
    assert torch.equal(summed["b"], torch.tensor(10.0))


def test_all_false_mask_gives_zeros():
    tree = {"a": torch.full((3, 2), float("nan"))}
    summed, _ = fdp.aggregate().update(tree, (), mask=torch.zeros(3, dtype=torch.bool))
    assert torch.equal(summed["a"], torch.zeros(2))


def test_aggregate_declares_reduce_stage():
    assert fdp.aggregate().stage == REDUCE
    assert fdp.aggregate().sensitivity is None


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(5, dtype=torch.bool), r"mask must have shape \(4,\).*got shape \(5,\)"),
        (torch.ones(4, 1, dtype=torch.bool), r"mask must have shape \(4,\).*got shape \(4, 1\)"),
        (torch.ones(4), r"mask must be a bool tensor, got a torch.float32 tensor"),
        (torch.ones(4, dtype=torch.int64), r"mask must be a bool tensor, got a torch.int64 tensor"),
        ([True] * 4, r"mask must be a bool tensor, got list"),
    ],
)
def test_bad_mask_raises(mask, message):
    tree = {"a": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match=message):
        fdp.aggregate().update(tree, (), mask=mask)


def test_leaves_with_different_batch_sizes_raise():
    tree = {"a": torch.zeros(4, 2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match="leading dimension"):
        fdp.aggregate().update(tree, (), mask=torch.ones(4, dtype=torch.bool))

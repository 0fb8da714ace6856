"""Tests for funcdp/testing: the strategies draw what they promise, the checks catch bad transforms."""

from __future__ import annotations

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcdp as fdp
from funcdp import transforms as T
from funcdp.testing import (
    DTYPES,
    check_pure,
    check_sensitivity,
    masks,
    neighbouring_batches,
    param_trees,
    per_example_trees,
)

PARAMS = {"w": torch.zeros(3), "block": {"b": torch.zeros(2, 2)}}


def _rows(tree) -> torch.Tensor:
    leaves = optree.tree_leaves(tree)
    return torch.cat([x.double().reshape(x.shape[0], -1) for x in leaves], 1)


# ---- the checks catch what they should ---------------------------------------------------------


def test_check_sensitivity_catches_a_transform_that_allows_twice_its_claim():
    wrong = T.clip_by(lambda n: 2 * T.flat_factors(1.0)(n), 1.0)  # declares C, allows 2C
    with pytest.raises(AssertionError, match="more than the declared bound 1"):
        check_sensitivity(wrong, max_examples=200)


def test_check_sensitivity_catches_a_slightly_wrong_claim():
    wrong = T.clip_by(T.flat_factors(1.0), 0.99)
    with pytest.raises(AssertionError, match="more than the declared bound"):
        check_sensitivity(wrong, params=PARAMS, max_examples=200)


def test_check_sensitivity_replace_one_needs_twice_the_bound():
    # Flat clipping at C passes replace-one with bound 2C, but not with bound C.
    check_sensitivity(fdp.clip(1.0), params=PARAMS, relation="replace", max_examples=100)
    half = T.clip_by(T.flat_factors(1.0), 0.6)  # 2 * 0.6 < the 2.0 two real rows can move
    with pytest.raises(AssertionError, match=r"\(replace, row"):
        check_sensitivity(half, params=PARAMS, relation="replace", max_examples=200)


def test_check_sensitivity_catches_dependence_on_padded_rows():
    def uses_all_rows(norms):  # shrinks everything a little if ANY row, padded ones too, is big
        shrink = 1.0 - 1e-3 * (norms > 100).any().to(norms.dtype)
        return T.flat_factors(1.0)(norms) * shrink

    # Declared 1.1 so that the small shrink cannot break the bound: only padding can fail it.
    with pytest.raises(AssertionError, match="depends on the values of padded rows"):
        check_sensitivity(T.clip_by(uses_all_rows, 1.1), params=PARAMS, max_examples=200)


def test_check_sensitivity_refuses_transforms_without_a_claim():
    with pytest.raises(ValueError, match="per-example transform that declares its sensitivity"):
        check_sensitivity(T.aggregate())
    with pytest.raises(ValueError, match="relation must be one of"):
        check_sensitivity(fdp.clip(1.0), relation="swap")


def _per_example(update):
    return fdp.GradientTransformation(lambda params: (), update, T.PER_EXAMPLE, sensitivity=1.0)


def test_check_pure_catches_in_place_mutation():
    def update(updates, state, params=None, *, key=None, mask=None):
        for leaf in optree.tree_leaves(updates):
            leaf.mul_(0.5)
        return updates, state

    with pytest.raises(AssertionError, match="changed its inputs in place"):
        check_pure(_per_example(update), params=PARAMS, max_examples=50)


def test_check_pure_catches_hidden_randomness_and_hidden_state():
    def noisy(updates, state, params=None, *, key=None, mask=None):
        return optree.tree_map(lambda g: g + torch.randn_like(g), updates), state

    with pytest.raises(AssertionError, match="different results"):
        check_pure(_per_example(noisy), params=PARAMS, max_examples=50)
    calls = []

    def counting(updates, state, params=None, *, key=None, mask=None):
        calls.append(1)
        return optree.tree_map(lambda g: g * len(calls), updates), state

    with pytest.raises(AssertionError, match="different results"):
        check_pure(_per_example(counting), params=PARAMS, max_examples=50)


def test_check_pure_covers_the_rest_of_the_chain():
    # noise, normalization, accounting and the optimizers (aggregate stage) are pure too
    privatizer = T.chain(
        fdp.clip(1.0), T.aggregate(), T.gaussian_noise(1.0), T.normalize(4.0), T.account(0.1)
    )
    check_pure(privatizer, params=PARAMS, max_examples=100)
    check_pure(T.aggregate(), params=PARAMS, max_examples=50)
    for optimizer in (fdp.optim.sgd(0.1, momentum=0.9), fdp.optim.adamw(0.01)):
        check_pure(optimizer, params=PARAMS, max_examples=50)


# ---- the strategies draw what they promise -----------------------------------------------------


@settings(max_examples=100)
@given(tree=param_trees())
def test_param_trees_are_dicts_of_tensors_in_the_allowed_dtypes(tree):
    leaves = optree.tree_leaves(tree)
    assert 1 <= len(leaves) <= 3
    assert all(leaf.dtype in DTYPES and leaf.dim() <= 3 for leaf in leaves)


@settings(max_examples=100)
@given(data=st.data())
def test_per_example_trees_have_a_batch_dimension_and_the_asked_kinds(data):
    size = data.draw(st.integers(1, 6))
    kind = data.draw(st.sampled_from(("zero", "nonfinite", "huge", "tiny")))
    grads = data.draw(per_example_trees(PARAMS, size, kinds=(kind,)))
    assert optree.tree_structure(grads) == optree.tree_structure(PARAMS)
    rows = _rows(grads)
    assert rows.shape == (size, 7)
    finite = torch.isfinite(rows).all(1)
    if kind == "zero":
        assert (rows == 0).all()
    elif kind == "nonfinite":
        assert not finite.any()
        assert (torch.isfinite(rows).sum(1) == 6).all()  # exactly one bad entry per row
    elif kind == "huge":
        assert (rows.abs().max(1).values > 1e5).all()
    else:
        assert (rows.abs().max(1).values < 1e-15).all()


@settings(max_examples=100)
@given(data=st.data())
def test_masks_keep_at_least_min_real_rows(data):
    size = data.draw(st.integers(1, 8))
    need = data.draw(st.integers(0, size))
    mask = data.draw(masks(size, min_real=need))
    assert mask.dtype == torch.bool and mask.shape == (size,) and int(mask.sum()) >= need


@settings(max_examples=200)
@given(data=st.data())
def test_neighbouring_batches_differ_in_exactly_one_real_example(data):
    relation = data.draw(st.sampled_from(("add_remove", "replace")))
    pair = data.draw(neighbouring_batches(PARAMS, relation=relation))
    first = _rows(pair.grads)[pair.mask]
    second = _rows(pair.other_grads)[pair.other_mask]
    if relation == "replace":
        assert first.shape == second.shape
        differ = [i for i in range(first.shape[0]) if not torch.equal(first[i], second[i])]
        assert len(differ) <= 1  # a fresh row may equal the old one only if both are zero
    else:
        big, small = (first, second) if first.shape[0] > second.shape[0] else (second, first)
        assert big.shape[0] == small.shape[0] + 1
        # removing one row of `big` gives `small`, in order
        matches = [
            i for i in range(big.shape[0]) if torch.equal(torch.cat([big[:i], big[i + 1 :]]), small)
        ]
        assert matches
    assert torch.isfinite(first).all() and torch.isfinite(second).all()


def test_neighbouring_batches_refuses_unknown_relations():
    @settings(max_examples=1)
    @given(data=st.data())
    def draw_one(data):
        data.draw(neighbouring_batches(PARAMS, relation="swap"))

    with pytest.raises(ValueError, match="relation must be one of"):
        draw_one()

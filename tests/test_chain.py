"""Tests for funcdp/transforms/base.py: chain's order checks, state, keys and split_at_reduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import funcdp as fdp
from funcdp import random as fdr
from funcdp.transforms import AGGREGATE, PER_EXAMPLE, REDUCE, GradientTransformation
from funcdp.transforms.base import split_at_reduce


def _per_example(batch: int = 6, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(batch, 4, 3, generator=gen) * 3,
        "b": torch.randn(batch, 3, generator=gen),
    }


def _full_chain():
    return fdp.chain(
        fdp.clip(1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(0.8),
        fdp.normalize(expected_batch_size=5),
        fdp.account(sample_rate=0.01),
    )


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: fdp.chain(fdp.clip(1.0), fdp.gaussian_noise(1.0), fdp.aggregate()),
            "before aggregate",
        ),
        (lambda: fdp.chain(fdp.aggregate(), fdp.clip(1.0)), "after aggregate"),
        (lambda: fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.aggregate()), "after aggregate"),
        (lambda: fdp.chain(fdp.aggregate(), fdp.gaussian_noise(1.0)), "bounded sensitivity"),
        (
            lambda: fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.account(0.1)),
            "account needs gaussian_noise",
        ),
        (
            lambda: fdp.chain(
                fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0), fdp.budget(1.0, delta=1e-5)
            ),
            "budget needs account",
        ),
        (lambda: fdp.chain(fdp.clip(1.0), fdp.normalize(10), fdp.aggregate()), "before aggregate"),
        (lambda: fdp.chain(fdp.clip(1.0), fdp.gaussian_noise(1.0)), "before aggregate"),
        (
            lambda: fdp.chain(fdp.chain(fdp.clip(1.0), fdp.aggregate()), fdp.clip(1.0)),
            "after aggregate",
        ),
    ],
)
def test_wrong_orders_are_refused_when_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_unknown_stage_and_non_transforms_are_refused():
    odd = fdp.identity()._replace(stage="sideways")
    with pytest.raises(ValueError, match="unknown stage 'sideways'"):
        fdp.chain(odd)
    with pytest.raises(TypeError, match="chain takes GradientTransformations, got function"):
        fdp.chain(fdp.clip(1.0), lambda g: g)


def test_chain_carries_sensitivity_and_stage():
    privatizer = _full_chain()
    assert privatizer.sensitivity == 1.0
    assert privatizer.stage == REDUCE
    assert fdp.chain(fdp.clip(2.0)).stage == PER_EXAMPLE
    assert fdp.chain(fdp.clip(2.0)).sensitivity == 2.0
    assert fdp.chain(fdp.clip(2.0), fdp.aggregate(), fdp.identity()).stage == REDUCE
    assert fdp.chain(fdp.clip(5.0), fdp.aggregate(), fdp.normalize(3)).sensitivity == 5.0


def test_state_is_a_tuple_per_part():
    privatizer = _full_chain()
    state = privatizer.init({"w": torch.zeros(4, 3), "b": torch.zeros(3)})
    assert isinstance(state, tuple) and len(state) == 5 == len(privatizer.parts)
    assert state[:4] == ((), (), (), ())
    assert state[4] == fdp.AccountState(fdp.Ledger())
    _, new_state = privatizer.update(_per_example(), state, key=fdr.key(0))
    assert isinstance(new_state, tuple) and len(new_state) == 5
    assert new_state[4].ledger.steps == 1
    assert state[4].ledger.steps == 0  # the old state is untouched


def test_state_of_the_wrong_length_is_refused():
    privatizer = _full_chain()
    with pytest.raises(ValueError, match="chain state has 4 entries, expected 5"):
        privatizer.update(_per_example(), ((),) * 4, key=fdr.key(0))


def test_nested_chains_flatten(trees_equal):
    flat = _full_chain()
    nested = fdp.chain(
        fdp.chain(fdp.chain(fdp.clip(1.0), fdp.aggregate()), fdp.gaussian_noise(0.8)),
        fdp.normalize(expected_batch_size=5),
        fdp.account(sample_rate=0.01),
    )
    assert len(nested.parts) == 5
    assert [p.stage for p in nested.parts] == [p.stage for p in flat.parts]
    state = nested.init(None)
    assert len(state) == 5
    key, mask = fdr.key(7), torch.tensor([True, True, False, True, False, True])
    out_nested, state_nested = nested.update(_per_example(), state, key=key, mask=mask)
    out_flat, state_flat = flat.update(_per_example(), flat.init(None), key=key, mask=mask)
    trees_equal(out_nested, out_flat)
    assert state_nested == state_flat


def test_each_part_gets_its_own_key():
    # Two noise transforms must not draw the same noise: the sum has variance 2 (sigma C)^2, not
    # (2 sigma C)^2 as it would if both used one key.
    privatizer = fdp.chain(
        fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0), fdp.gaussian_noise(1.0)
    )
    per_example = {"a": torch.zeros(2, 20_000)}
    out, _ = privatizer.update(per_example, privatizer.init(None), key=fdr.key(0))
    values = out["a"].double().numpy()
    assert stats.kstest(values / np.sqrt(2.0), "norm").pvalue > 1e-6
    assert stats.kstest(values / 2.0, "norm").pvalue < 1e-6


def test_chain_passes_mask_and_params():
    def add_params():
        def update(updates, state, params=None, *, key=None, mask=None):
            del key, mask
            return fdp.tree.tree_add(updates, params), state + 1

        return GradientTransformation(lambda params: 0, update, AGGREGATE)

    privatizer = fdp.chain(fdp.clip(100.0), fdp.aggregate(), add_params())
    per_example = _per_example()
    params = {"w": torch.ones(4, 3), "b": torch.ones(3)}
    mask = torch.tensor([True, False, True, False, False, False])
    out, state = privatizer.update(per_example, privatizer.init(params), params, mask=mask)
    assert state == ((), (), 1)
    for name in params:
        torch.testing.assert_close(out[name], per_example[name][mask].sum(0) + 1.0)


def test_identity_changes_nothing():
    tree = _per_example()
    out, state = fdp.identity().update(tree, (), key=fdr.key(0))
    assert out is tree and state == ()


@pytest.mark.parametrize("masked", [False, True])
def test_split_at_reduce_matches_the_whole_chain(masked, trees_equal):
    privatizer = _full_chain()
    split = split_at_reduce(privatizer)
    first, second, index = split.through_sum, split.after_sum, split.index
    assert index == 2 and first.stage == REDUCE and second.stage == AGGREGATE
    key = fdr.key(11)
    mask = torch.tensor([True, False, True, True, False, True]) if masked else None
    state = privatizer.init(None)
    whole, whole_state = privatizer.update(_per_example(), state, key=key, mask=mask)
    summed, first_state = first.update(_per_example(), state[:index], key=key, mask=mask)
    out, second_state = second.update(summed, state[index:], key=key)
    trees_equal(out, whole)
    assert first_state + second_state == whole_state


def test_split_at_reduce_over_micro_batches(trees_close):
    # The train step runs the first half per micro-batch and sums: same result up to rounding.
    privatizer = _full_chain()
    split = split_at_reduce(privatizer)
    first, second, index = split.through_sum, split.after_sum, split.index
    key, per_example = fdr.key(3), _per_example(batch=8)
    state = privatizer.init(None)
    whole, _ = privatizer.update(per_example, state, key=key)
    halves = [
        first.update({k: v[i : i + 4] for k, v in per_example.items()}, state[:index], key=key)[0]
        for i in (0, 4)
    ]
    out, _ = second.update(fdp.tree.tree_add(*halves), state[index:], key=key)
    trees_close(out, whole, rtol=1e-5, atol=1e-6)


def test_split_at_reduce_needs_an_aggregate():
    with pytest.raises(ValueError, match="no aggregate"):
        split_at_reduce(fdp.chain(fdp.clip(1.0)))


def _times_ten_per_example() -> GradientTransformation:
    """A per-example transform that scales every example by 10 and declares nothing."""

    def update(updates, state, params=None, *, key=None, mask=None):
        return fdp.tree.tree_scale(updates, 10.0), state

    return GradientTransformation(lambda params: (), update, PER_EXAMPLE)


def test_per_example_transform_without_declared_sensitivity_after_clip_makes_noise_refuse():
    # Scaling after the clip breaks the bound C; inheriting it would under-noise by 10x.
    with pytest.raises(ValueError, match="bounded sensitivity"):
        fdp.chain(fdp.clip(1.0), _times_ten_per_example(), fdp.aggregate(), fdp.gaussian_noise(1.0))
    # Before the clip it does no harm: the clip sets the bound again.
    chained = fdp.chain(
        _times_ten_per_example(), fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0)
    )
    assert chained.sensitivity == 1.0


def test_chain_of_aggregate_stage_transforms_builds_alone_and_nests():
    tail = fdp.chain(fdp.normalize(4), fdp.identity())
    out, _ = tail.update({"w": torch.full((3,), 8.0)}, tail.init(None))
    assert torch.equal(out["w"], torch.full((3,), 2.0))
    whole = fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(0.0), tail)
    assert whole.sensitivity == 1.0


def test_a_chain_binds_once_and_its_split_reuses_that_binding():
    """`chain` keeps the parts it bound and what they resolved to; `split_at_reduce` cuts
    them, it does not bind them again (a bind that counts its calls sees one)."""
    calls = []
    noise = fdp.gaussian_noise(1.0)

    def counting_bind(context):
        calls.append(context)
        return noise.bind(context)

    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate(), noise._replace(bind=counting_bind))
    assert len(calls) == 1
    split = split_at_reduce(privatizer)
    assert len(calls) == 1
    assert split.context is privatizer.plan.context and split.context.noise_multiplier == 1.0
    assert split.head == privatizer.plan.bound[: split.index]
    fdp.chain(privatizer, fdp.account(0.01))  # nested: the outer chain binds its own parts
    assert len(calls) == 2

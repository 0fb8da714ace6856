"""Cyclic Poisson and balls-in-bins batches (funcdp/_cyclic_sampling.py, via funcdp.data)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import funcdp as fdp
from funcdp.data import balls_in_bins_batches, cyclic_poisson_batches


def _members(batches):
    return [set(b.indices[b.mask].tolist()) for b in batches]


def test_units_join_only_the_steps_of_their_group():
    n, b, q, steps = 50, 4, 0.6, 40
    members = _members(
        cyclic_poisson_batches(n, q, key=fdp.random.key(0), min_separation=b, steps=steps)
    )
    steps_of = {i: [t for t, m in enumerate(members) if i in m] for i in range(n)}
    for joined in steps_of.values():
        assert len({t % b for t in joined}) <= 1  # one group
        assert all(t2 - t1 >= b for t1, t2 in itertools.pairwise(joined))
        assert len(joined) <= math.ceil(steps / b)


def test_groups_partition_the_examples_into_near_equal_parts():
    n, b = 50, 4
    batches = cyclic_poisson_batches(n, 1.0, key=fdp.random.key(0), min_separation=b, steps=2 * b)
    members = _members(batches)
    groups = members[:b]
    assert members[b:] == groups  # q = 1: step t is the whole group t mod b
    assert sorted(i for g in groups for i in g) == list(range(n))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert groups != [set(range(k, n, b)) for k in range(b)]  # a keyed permutation, not i mod b


def test_inclusion_rate_within_the_group_is_q():
    n, b, q, steps = 200, 5, 0.3, 200
    batches = list(
        cyclic_poisson_batches(n, q, key=fdp.random.key(1), min_separation=b, steps=steps)
    )
    joined = sum(int(batch.mask.sum()) for batch in batches)
    trials = steps * n / b  # each step offers one group of n / b examples
    z = (joined - q * trials) / math.sqrt(trials * q * (1 - q))
    assert abs(z) < 4


def test_batches_are_padded_masked_and_reproducible():
    kwargs = dict(key=fdp.random.key(2), min_separation=3, steps=9, bucket_size=4)
    first = list(cyclic_poisson_batches(30, 0.5, **kwargs))
    again = list(cyclic_poisson_batches(30, 0.5, **kwargs))
    resumed = list(cyclic_poisson_batches(30, 0.5, start=5, **{**kwargs, "steps": 4}))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.mask, b.mask)
    for a, b in zip(first[5:], resumed, strict=True):
        assert torch.equal(a.indices, b.indices)
    for batch in first:
        assert len(batch.mask) % 4 == 0 and batch.indices[~batch.mask].eq(0).all()
        real = int(batch.mask.sum())
        assert batch.mask[:real].all() and not batch.mask[real:].any()


def test_one_group_is_plain_poisson_membership():
    members = _members(
        cyclic_poisson_batches(20, 0.9, key=fdp.random.key(3), min_separation=1, steps=3)
    )
    assert all(len(m) > 10 for m in members)  # every example may join every step


def test_rank_shards_partition_the_logical_batch():
    kwargs = dict(key=fdp.random.key(4), min_separation=3, steps=6)
    whole = list(cyclic_poisson_batches(60, 0.5, **kwargs))
    shards = [
        list(cyclic_poisson_batches(60, 0.5, rank=r, world_size=3, **kwargs)) for r in range(3)
    ]
    for t, batch in enumerate(whole):
        real = batch.indices[batch.mask].tolist()
        parts = [shard[t].indices[shard[t].mask].tolist() for shard in shards]
        assert [real[r::3] for r in range(3)] == parts  # disjoint, and together the batch
    default = len(whole[0].mask)
    assert len(shards[0][0].mask) == math.ceil(default / 3)  # the default bucket is divided


def test_balls_in_bins_puts_each_example_in_one_step_per_epoch():
    n, per_epoch = 37, 5
    batches = balls_in_bins_batches(
        n,
        key=fdp.random.key(4),
        steps_per_epoch=per_epoch,
        steps=2 * per_epoch,
        allow_non_poisson=True,
    )
    members = _members(batches)
    for epoch in range(2):
        seen = [i for m in members[epoch * per_epoch : (epoch + 1) * per_epoch] for i in m]
        assert sorted(seen) == list(range(n))
    assert members[:per_epoch] != members[per_epoch:]  # a new assignment each epoch


def test_balls_in_bins_needs_the_flag_and_correlated_noise_refuses_it():
    with pytest.raises(ValueError, match="allow_non_poisson=True"):
        balls_in_bins_batches(10, key=fdp.random.key(0), steps_per_epoch=2)
    with pytest.raises(ValueError, match="needs \\(cyclic\\) Poisson batches"):
        fdp.chain(
            fdp.clip(1.0),
            fdp.aggregate(),
            fdp.transforms.correlated_noise(1.0, fdp.mf.banded(10, 1, min_separation=1)),
            fdp.account(0.5, poisson=False),
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_separation": 0}, "min_separation must be an int >= 1, got 0"),
        ({"min_separation": 11}, "min_separation must be <= num_examples=10, got 11"),
        ({"min_separation": 2, "steps": -1}, "steps must be an int >= 0"),
        ({"min_separation": 2, "bucket_size": 0}, "bucket_size must be an int >= 1"),
        ({"min_separation": 2, "world_size": 0}, "world_size must be an int >= 1, got 0"),
        (
            {"min_separation": 2, "rank": 2, "world_size": 2},
            "rank must be an int in \\[0, 2\\), got 2",
        ),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cyclic_poisson_batches(10, 0.5, key=fdp.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="sample_rate must be in \\(0, 1\\]"):
        cyclic_poisson_batches(10, 1.5, key=fdp.random.key(0), min_separation=2)

"""Tests for funcdp/_user_sampling.py and user-level DP-SGD (funcdp.federated.user_loss).

The unit of privacy is a user: Poisson over users, at most k random rows per sampled user,
masks at both levels. The property that matters: removing ALL rows of one user moves the
clipped sum by at most C (hypothesis, users with 1..50 rows), which record-level clipping
violates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import find, given, settings
from hypothesis import strategies as st
from scipy import stats

import funcdp as fdp
from funcdp import federated as fed
from funcdp.data import Batch, PoissonLoader, UserIndexBatch, UserLoader, user_batches
from tests.conftest import assert_trees_close, assert_trees_equal

D, CLASSES, CLIP = 4, 3, 0.05

# ------------------------------------------------------------------------------ the sampler


def _ids(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), 100 + 7 * u) for u, n in enumerate(counts)])


def test_batches_have_fixed_shapes_and_masks_at_both_levels():
    counts = [1, 3, 8, 20, 2, 5]
    ids = _ids(counts)
    k = 4
    for batch in user_batches(ids, 0.5, key=fdp.random.key(0), max_examples_per_user=k, steps=30):
        assert isinstance(batch, UserIndexBatch)
        u = batch.mask.shape[0]
        assert batch.indices.shape == (u, k) and batch.rows.shape == (u, k)
        assert batch.indices.dtype == torch.long and batch.rows.dtype == torch.bool
        assert not batch.rows[~batch.mask].any()  # a padded user has no real rows
        assert bool(batch.mask[: int(batch.mask.sum())].all())  # real users first
        for i in range(int(batch.mask.sum())):
            chosen = batch.indices[i][batch.rows[i]]
            owners = ids[chosen].unique()
            assert len(owners) == 1  # one user's rows only
            owner = (int(owners[0]) - 100) // 7
            assert len(chosen) == min(counts[owner], k)
            assert len(chosen.unique()) == len(chosen)  # no row twice


def test_each_user_joins_with_probability_q():
    num_users, q, steps = 20, 0.3, 2000
    ids = _ids([3] * num_users)
    joined = torch.zeros(num_users)
    for batch in user_batches(ids, q, key=fdp.random.key(1), max_examples_per_user=2, steps=steps):
        users = (ids[batch.indices[batch.mask, 0]] - 100) // 7
        joined[users] += 1
    # Each count is Binomial(steps, q); a chi-square over users of the standardized counts.
    z = (joined.numpy() - steps * q) / math.sqrt(steps * q * (1 - q))
    assert stats.chi2.sf(float(np.sum(z**2)), num_users) > 1e-4


def test_rows_of_a_user_are_a_uniform_random_subset():
    ids = torch.zeros(10, dtype=torch.long)  # one user with 10 rows, k = 3
    picked = torch.zeros(10)
    steps = 3000
    for batch in user_batches(
        ids, 1.0, key=fdp.random.key(2), max_examples_per_user=3, steps=steps
    ):
        picked[batch.indices[0][batch.rows[0]]] += 1
    assert picked.sum() == 3 * steps
    _, p_value = stats.chisquare(picked.numpy(), np.full(10, 0.3 * steps))
    assert p_value > 1e-4


def test_row_test_has_power_against_a_fixed_subset():
    picked = np.array([3000.0] * 3 + [0.0] * 7)  # always the first three rows
    _, p_value = stats.chisquare(picked, np.full(10, 900.0))
    assert p_value < 1e-4


def test_same_key_same_batches_and_resume_matches():
    ids = _ids([2, 5, 9, 1, 4])
    args = dict(key=fdp.random.key(3), max_examples_per_user=3)
    whole = list(user_batches(ids, 0.4, steps=6, **args))
    again = list(user_batches(ids, 0.4, steps=6, **args))
    resumed = list(user_batches(ids, 0.4, steps=2, start=4, **args))
    for a, b in zip(whole, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(whole[4:], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    other = list(user_batches(ids, 0.4, steps=6, key=fdp.random.key(4), max_examples_per_user=3))
    assert any(not torch.equal(a.mask, b.mask) for a, b in zip(whole, other, strict=True))


def test_groups_of_k_examples_are_units():
    n, k = 12, 3
    ids = torch.arange(n) // k
    (batch,) = user_batches(ids, 1.0, key=fdp.random.key(0), max_examples_per_user=k, steps=1)
    groups = sorted(sorted(row.tolist()) for row in batch.indices[batch.mask])
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_loader_gathers_zero_padded_units():
    x = torch.arange(1, 13, dtype=torch.float32).reshape(12, 1).repeat(1, 2)
    y = torch.arange(1, 13)
    ids = _ids([1, 4, 7])
    loader = UserLoader((x, y), ids, 0.5, key=fdp.random.key(5), max_examples_per_user=5, steps=4)
    assert loader.expected_batch_size == pytest.approx(1.5)
    assert len(loader) == 4
    for batch in loader:
        assert isinstance(batch, Batch) and batch.bucket_size == loader.bucket_size == 3
        xs, ys, rows = batch.inputs
        assert xs.shape == (*rows.shape, 2) and ys.shape == rows.shape
        assert bool((xs[~rows] == 0).all()) and bool((ys[~rows] == 0).all())
        assert bool((ys[rows] > 0).all())
    assert loader.next_step == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(max_examples_per_user=0), "max_examples_per_user"),
        (dict(max_examples_per_user=2.5), "max_examples_per_user"),
        (dict(steps=-1), "steps"),
        (dict(bucket_size=0), "bucket_size"),
        (dict(user_ids=torch.tensor([0.5, 1.5])), "integer"),
        (dict(user_ids=torch.zeros(2, 2, dtype=torch.long)), "1-d"),
    ],
)
def test_bad_arguments_are_refused_when_called(kwargs, match):
    args = dict(user_ids=_ids([2, 3]), sample_rate=0.5, max_examples_per_user=2)
    args.update(kwargs)
    user_ids, rate = args.pop("user_ids"), args.pop("sample_rate")
    with pytest.raises(ValueError, match=match):
        user_batches(user_ids, rate, key=fdp.random.key(0), **args)


def test_loader_refuses_user_ids_that_do_not_fit():
    x = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="user_ids"):
        UserLoader(
            (x,),
            torch.zeros(4, dtype=torch.long),
            0.5,
            key=fdp.random.key(0),
            max_examples_per_user=2,
        )


# ------------------------------------------------------------ user-level DP-SGD: sensitivity


def _model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, 6), torch.nn.Tanh(), torch.nn.Linear(6, CLASSES))
    return fdp.functionalize(net)


APPLY, PARAMS, BUFFERS = _model()


def _row_losses(params, buffers, x, y):
    return F.cross_entropy(APPLY(params, buffers, x), y, reduction="none")


def _example_loss(params, buffers, x, y):
    return F.cross_entropy(APPLY(params, buffers, x[None]), y[None])


def _clipped_sum(loss, batch: Batch, *, mode: str = "vmap"):
    """The clipped sum of the real units of `batch`, through the real train step (no noise,
    normalize(1), sgd(1): the parameters move by minus the sum)."""
    privatizer = fdp.chain(
        fdp.clip(CLIP),
        fdp.aggregate(),
        fdp.gaussian_noise(0.0),
        fdp.normalize(1.0),
        fdp.account(1.0),
    )
    optimizer = fdp.optim.sgd(1.0)
    step = fdp.make_train_step(loss, privatizer, optimizer, performance=fdp.Performance(mode=mode))
    state = fdp.TrainState.create(
        PARAMS, buffers=BUFFERS, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    new, _ = step(state, batch)
    return {name: state.params[name] - new.params[name] for name in PARAMS}


def _data(counts: list[int], seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    n = sum(counts)
    x = scale * torch.randn(n, D, generator=gen)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return x, y, _ids(counts)


def _without_user(x, y, ids, user: int):
    keep = ids != 100 + 7 * user
    return x[keep], y[keep], ids[keep]


def _distance(a, b) -> float:
    return math.sqrt(sum(float((a[n].double() - b[n].double()).square().sum()) for n in a))


# The neighbouring data sets are compared at q = 1 with k = 50 rows per user, so both batches
# hold every row of every remaining user. (Below that, removing a user re-draws which users and
# rows the others get: equal in distribution, which is what the guarantee needs, but not
# coupled draw for draw.)
def _user_level_movement(case, mode: str = "vmap") -> float:
    counts, seed, scale, user, reduction = case
    loss = fed.user_loss(_row_losses, reduction=reduction)

    def summed(x, y, ids):
        loader = UserLoader((x, y), ids, 1.0, key=fdp.random.key(1), max_examples_per_user=50)
        return _clipped_sum(loss, next(iter(loader)), mode=mode)

    x, y, ids = _data(counts, seed, scale)
    return _distance(summed(x, y, ids), summed(*_without_user(x, y, ids, user)))


def _record_level_movement(case) -> float:
    counts, seed, scale, user, _ = case

    def summed(x, y):
        return _clipped_sum(
            _example_loss, next(iter(PoissonLoader((x, y), 1.0, key=fdp.random.key(1))))
        )

    x, y, ids = _data(counts, seed, scale)
    without_x, without_y, _ = _without_user(x, y, ids, user)
    return _distance(summed(x, y), summed(without_x, without_y))


@st.composite
def _cases(draw):
    counts = draw(st.lists(st.integers(1, 50), min_size=2, max_size=4))
    seed = draw(st.integers(0, 2**20))
    scale = draw(st.sampled_from([0.1, 1.0, 30.0]))
    user = draw(st.integers(0, len(counts) - 1))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    return counts, seed, scale, user, reduction


# Float32 sums of a few vectors of norm <= C round by far less than this.
SLACK = CLIP * (1 + 1e-5)


@settings(max_examples=40)
@given(_cases(), st.sampled_from(["vmap", "ghost"]))
def test_removing_all_rows_of_one_user_moves_the_sum_by_at_most_c(case, mode):
    assert _user_level_movement(case, mode) <= SLACK


def test_record_level_clipping_fails_the_user_level_check():
    # A search over the same cases finds one where record-level clipping moves the sum past C.
    case = find(
        _cases(), lambda c: _record_level_movement(c) > SLACK, settings=settings(max_examples=40)
    )
    assert _record_level_movement(case) > SLACK
    assert _user_level_movement(case) <= SLACK
    # And plainly: a user with 20 rows moves the record-level sum by far more than C.
    big = ([20, 3], 0, 30.0, 0, "mean")
    assert _record_level_movement(big) > 3 * CLIP
    assert _user_level_movement(big) <= SLACK


def test_user_whose_rows_are_masked_out_contributes_exactly_zero():
    x, y, ids = _data([4, 6, 2], seed=3, scale=1.0)
    loader = UserLoader((x, y), ids, 1.0, key=fdp.random.key(1), max_examples_per_user=8)
    batch = next(iter(loader))
    xs, ys, rows = batch.inputs
    no_rows = rows.clone()
    no_rows[1] = False  # user 1 sampled, but none of its rows real
    unsampled = batch.mask.clone()
    unsampled[1] = False
    loss = fed.user_loss(_row_losses)
    grads = fdp.per_sample_grads(lambda p, *unit: loss(p, BUFFERS, *unit))(PARAMS, xs, ys, no_rows)
    assert all(bool((g[1] == 0).all()) for g in grads.values())
    empty = _clipped_sum(loss, Batch((xs, ys, no_rows), batch.mask))
    absent = _clipped_sum(loss, Batch((xs, ys, rows), unsampled))
    assert_trees_equal(empty, absent)
    assert _distance(empty, {n: torch.zeros_like(p) for n, p in PARAMS.items()}) > 0


@pytest.mark.parametrize("mode", ["ghost", "auto"])
def test_ghost_mode_handles_user_units(mode):
    x, y, ids = _data([5, 1, 9, 3, 12], seed=4, scale=3.0)
    batch = next(iter(UserLoader((x, y), ids, 0.7, key=fdp.random.key(2), max_examples_per_user=6)))
    assert 0 < int(batch.mask.sum()) < len(batch.mask)
    loss = fed.user_loss(_row_losses, reduction="sum")
    assert_trees_close(
        _clipped_sum(loss, batch, mode=mode), _clipped_sum(loss, batch), rtol=1e-5, atol=1e-6
    )


def test_user_loss_refuses_per_example_losses_of_the_wrong_shape():
    loss = fed.user_loss(lambda p, b, x, y: F.cross_entropy(APPLY(p, b, x), y))  # mean, not [k]
    x, y, rows = (
        torch.zeros(3, D),
        torch.zeros(3, dtype=torch.long),
        torch.ones(3, dtype=torch.bool),
    )
    with pytest.raises(ValueError, match="one loss per row"):
        loss(PARAMS, BUFFERS, x, y, rows)
    with pytest.raises(ValueError, match="reduction"):
        fed.user_loss(_row_losses, reduction="max")

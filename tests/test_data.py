"""Tests for funcdp/data.py: Poisson sampling with fixed shapes, and the loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import funcdp as fdp
from funcdp import random as fdr
from funcdp.data import Batch, IndexBatch, PoissonLoader, default_bucket_size, poisson_batches


def _real_indices(batch: IndexBatch) -> list[int]:
    return batch.indices[batch.mask].tolist()


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.indices, y.indices) and torch.equal(x.mask, y.mask)
        for x, y in zip(a, b, strict=True)
    )


# ---------------------------------------------------------------- the batch size distribution


def test_batch_sizes_follow_binomial():
    n, q, steps = 200, 0.05, 3000
    sizes = np.array(
        [int(b.mask.sum()) for b in poisson_batches(n, q, key=fdr.key(0), steps=steps)]
    )
    # Mean and variance of Binomial(n, q): 10 and 9.5; 5 standard errors of slack.
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert sizes.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=0.1)
    # Chi-square goodness of fit on bins with enough expected counts, tails pooled.
    edges = list(range(4, 17))  # bins: <=4, 5, ..., 16, >=17
    cdf = stats.binom.cdf
    probs = [cdf(edges[0], n, q)]
    probs += [stats.binom.pmf(k, n, q) for k in edges[1:]]
    probs.append(1 - cdf(edges[-1], n, q))
    observed = [np.sum(sizes <= edges[0])]
    observed += [np.sum(sizes == k) for k in edges[1:]]
    observed.append(np.sum(sizes > edges[-1]))
    expected = np.array(probs) * steps
    assert expected.min() > 5
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 1e-3


def test_batch_size_test_detects_a_wrong_rate():
    # The statistic used above has power: sizes drawn at q=0.06 are rejected as Binomial(n, 0.05).
    n, steps = 200, 3000
    sizes = [int(b.mask.sum()) for b in poisson_batches(n, 0.06, key=fdr.key(0), steps=steps)]
    p_value = stats.kstest(sizes, stats.binom(n, 0.05).cdf).pvalue
    assert p_value < 1e-6


def test_membership_is_independent_with_rate_q():
    # Each example's inclusion frequency is q; pairs of examples co-occur at rate q^2.
    n, q, steps = 20, 0.3, 2000
    member = torch.zeros(steps, n)
    for t, batch in enumerate(poisson_batches(n, q, key=fdr.key(3), steps=steps)):
        member[t, _real_indices(batch)] = 1.0
    freq = member.mean(0)
    assert torch.all((freq - q).abs() < 5 * math.sqrt(q * (1 - q) / steps))
    co = (member.T @ member / steps).fill_diagonal_(q * q)
    assert torch.all((co - q * q).abs() < 5 * math.sqrt(q * q * (1 - q * q) / steps))


def test_every_example_appears():
    n, q = 50, 0.1
    seen = set()
    for batch in poisson_batches(n, q, key=fdr.key(1), steps=300):
        seen.update(_real_indices(batch))
    assert seen == set(range(n))


# ---------------------------------------------------------------- shapes and the mask


@settings(max_examples=40, derandomize=True, deadline=None)
@given(
    n=st.integers(1, 300),
    q=st.floats(0.001, 1.0),
    bucket=st.one_of(st.none(), st.integers(1, 50)),
    seed=st.integers(0, 2**32),
)
def test_batch_structure(n, q, bucket, seed):
    size = default_bucket_size(n, q) if bucket is None else bucket
    for batch in poisson_batches(n, q, key=fdr.key(seed), steps=3, bucket_size=bucket):
        assert batch.indices.dtype == torch.long and batch.mask.dtype == torch.bool
        assert batch.indices.shape == batch.mask.shape
        rows, real = len(batch.mask), int(batch.mask.sum())
        # Padded to a multiple of the bucket, with at least one row and no more padding than needed.
        assert rows % size == 0 and rows >= max(real, 1)
        assert rows == size or rows - size < real
        # Real rows first, then padding; real indices distinct, in range, in increasing order.
        assert batch.mask[:real].all() and not batch.mask[real:].any()
        idx = _real_indices(batch)
        assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
        assert torch.all(batch.indices[~batch.mask] == 0)


def test_shapes_are_fixed_with_the_default_bucket():
    n, q = 1000, 0.02
    shapes = {b.mask.shape for b in poisson_batches(n, q, key=fdr.key(2), steps=200)}
    assert shapes == {(default_bucket_size(n, q),)} == {(47,)}  # mean 20 + 6 sd, 4.43 each


def test_the_loaders_bucket_is_mean_plus_two_sd_and_passed_on():
    """Mean 20, sd 4.43: `PoissonLoader` pads to buckets of 29 rows and says so in each batch;
    a batch exceeds one bucket (and is padded to two) as often as Binomial(1000, 0.02)
    exceeds 29."""
    n, q, steps = 1000, 0.02, 2000
    data = (torch.arange(n),)
    loader = PoissonLoader(data, q, key=fdr.key(2), steps=steps)
    assert loader.bucket_size == default_bucket_size(n, q, sds=2.0) == 29
    batches = list(loader)
    assert {b.bucket_size for b in batches} == {29}
    assert {len(b.mask) for b in batches} == {29, 58}
    p = sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(30, n + 1))
    over = sum(len(b.mask) > 29 for b in batches)
    assert abs(over - steps * p) <= 4 * math.sqrt(steps * p * (1 - p))


def test_never_truncates():
    n, q, key = 100, 0.5, fdr.key(4)
    wide = list(poisson_batches(n, q, key=key, steps=5, bucket_size=n))
    tiny = list(poisson_batches(n, q, key=key, steps=5, bucket_size=3))
    for w, t in zip(wide, tiny, strict=True):
        assert _real_indices(t) == _real_indices(w)
        assert len(t.mask) == 3 * math.ceil(int(w.mask.sum()) / 3)


def test_empty_batches_at_tiny_rate():
    batches = list(poisson_batches(10, 0.001, key=fdr.key(5), steps=50))
    empty = [b for b in batches if not b.mask.any()]
    assert len(empty) > 40
    for b in empty:
        assert len(b.mask) >= 1 and len(b.indices) == len(b.mask)


def test_full_rate_takes_everyone():
    for batch in poisson_batches(7, 1.0, key=fdr.key(6), steps=3):
        assert _real_indices(batch) == list(range(7))


def test_default_steps_is_one_epoch():
    assert len(list(poisson_batches(100, 0.1, key=fdr.key(0)))) == 10
    assert len(list(poisson_batches(100, 0.3, key=fdr.key(0)))) == 3
    assert len(list(poisson_batches(100, 0.1, key=fdr.key(0), steps=0))) == 0


# ---------------------------------------------------------------- determinism and resuming


def test_same_key_same_batches_different_key_different():
    first = list(poisson_batches(500, 0.05, key=fdr.key(7), steps=10))
    again = list(poisson_batches(500, 0.05, key=fdr.key(7), steps=10))
    other = list(poisson_batches(500, 0.05, key=fdr.key(8), steps=10))
    assert _same_batches(first, again)
    assert [_real_indices(b) for b in first] != [_real_indices(b) for b in other]
    # Successive steps of one run differ too.
    assert len({tuple(_real_indices(b)) for b in first}) == 10


def test_start_resumes_the_same_sequence():
    key = fdr.key(9)
    whole = list(poisson_batches(300, 0.05, key=key, steps=10))
    resumed = list(poisson_batches(300, 0.05, key=key, steps=4, start=6))
    assert _same_batches(whole[6:], resumed)


# ---------------------------------------------------------------- PoissonLoader


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _data(n: int = 60):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=gen), torch.arange(n)


def _same_loader_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        len(x.inputs) == len(y.inputs)
        and all(torch.equal(u, v) for u, v in zip(x.inputs, y.inputs, strict=True))
        and torch.equal(x.mask, y.mask)
        for x, y in zip(a, b, strict=True)
    )


def test_loader_gathers_the_sampled_rows():
    x, y = _data()
    key = fdr.key(10)
    loader = PoissonLoader((x, y), 0.1, key=key, steps=5)
    indices = poisson_batches(60, 0.1, key=key, steps=5, bucket_size=loader.bucket_size)
    for batch, index_batch in zip(loader, indices, strict=True):
        assert isinstance(batch, Batch) and batch.bucket_size == loader.bucket_size
        assert torch.equal(batch.mask, index_batch.mask)
        assert torch.equal(batch.inputs[0], x[index_batch.indices])
        assert torch.equal(batch.inputs[1], y[index_batch.indices])


def test_loader_over_tensors_and_datasets_agree():
    x, y = _data()
    key = fdr.key(11)
    over_tensors = list(PoissonLoader((x, y), 0.1, key=key, steps=6))
    for dataset in (torch.utils.data.TensorDataset(x, y), _PairDataset(x, y)):
        assert _same_loader_batches(
            over_tensors, list(PoissonLoader(dataset, 0.1, key=key, steps=6))
        )


class _SingleTensorDataset(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def test_loader_over_a_dataset_of_single_tensors():
    x, _ = _data()
    key = fdr.key(13)
    over_tensors = list(PoissonLoader((x,), 0.1, key=key, steps=4))
    over_dataset = list(PoissonLoader(_SingleTensorDataset(x), 0.1, key=key, steps=4))
    assert _same_loader_batches(over_tensors, over_dataset)


def test_loader_resumes_and_continues():
    x, y = _data()
    key = fdr.key(12)
    loader = PoissonLoader((x, y), 0.1, key=key, steps=4)
    first, second = list(loader), list(loader)
    assert loader.next_step == 8
    whole = list(PoissonLoader((x, y), 0.1, key=key, steps=8))
    assert _same_loader_batches(first + second, whole)
    resumed = list(PoissonLoader((x, y), 0.1, key=key, steps=3, start=5))
    assert _same_loader_batches(resumed, whole[5:])


def test_loader_properties():
    x, y = _data(60)
    loader = PoissonLoader((x, y), 0.05, key=fdr.key(0))
    assert loader.expected_batch_size == pytest.approx(3.0)
    assert len(loader) == 20 == len(list(loader))
    assert PoissonLoader((x, y), 0.05, key=fdr.key(0), steps=7).__len__() == 7
    bucketed = PoissonLoader((x, y), 0.5, key=fdr.key(0), steps=3, bucket_size=4)
    assert all(len(b.mask) % 4 == 0 and b.bucket_size == 4 for b in bucketed)
    assert {b.bucket_size for b in loader} == {loader.bucket_size}


def test_loader_rejects_mismatched_tensors_and_bad_data():
    with pytest.raises(ValueError, match="first dimension"):
        PoissonLoader((torch.zeros(5, 2), torch.zeros(6)), 0.1, key=fdr.key(0))
    with pytest.raises(TypeError, match="data"):
        PoissonLoader((), 0.1, key=fdr.key(0))


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("sample_rate", [0.0, -0.1, 1.5, math.nan, math.inf, True])
def test_bad_sample_rate_raises(sample_rate):
    with pytest.raises(ValueError, match="sample_rate"):
        list(poisson_batches(10, sample_rate, key=fdr.key(0), steps=1))
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonLoader((torch.zeros(10),), sample_rate, key=fdr.key(0))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_examples": 0}, "num_examples"),
        ({"num_examples": 2.5}, "num_examples"),
        ({"steps": -1}, "steps"),
        ({"bucket_size": 0}, "bucket_size"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    args = {"num_examples": 10, "sample_rate": 0.5, "key": fdr.key(0), "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=name):
        list(poisson_batches(**args))


def test_bad_key_raises():
    with pytest.raises(TypeError, match="key"):
        list(poisson_batches(10, 0.5, key=torch.zeros(2), steps=1))


def test_shuffled_batches_are_refused_without_the_flag():
    with pytest.raises(ValueError, match="allow_non_poisson"):
        fdp.shuffled_batches(10, 4, key=fdp.random.key(0))


def test_shuffled_batches_cover_each_epoch_once_with_fixed_shapes():
    batches = list(
        fdp.shuffled_batches(10, 4, key=fdp.random.key(0), steps=6, allow_non_poisson=True)
    )
    assert all(b.indices.shape == (4,) and b.mask.shape == (4,) for b in batches)
    for epoch in (batches[:3], batches[3:]):
        seen = torch.cat([b.indices[b.mask] for b in epoch])
        assert sorted(seen.tolist()) == list(range(10))
    assert [int(b.mask.sum()) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert not torch.equal(batches[0].indices, batches[3].indices)  # a new permutation


def test_secure_batches_draw_from_os_entropy_and_stay_binomial():
    first = list(poisson_batches(400, 0.1, key=None, steps=300, secure=True))
    again = list(poisson_batches(400, 0.1, key=fdr.key(0), steps=300, secure=True))
    assert any(
        not torch.equal(a.mask, b.mask) or not torch.equal(a.indices, b.indices)
        for a, b in zip(first, again, strict=True)
    )  # the key does not decide them
    sizes = np.array([int(b.mask.sum()) for b in first + again], dtype=float)
    mean, var = 400 * 0.1, 400 * 0.1 * 0.9
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / len(sizes))
    assert abs(sizes.var() / var - 1) < 0.2
    for batch in first:
        real = batch.indices[batch.mask]
        assert len(set(real.tolist())) == len(real)  # distinct examples


def test_secure_sampling_is_refused_across_ranks():
    with pytest.raises(ValueError, match="secure"):
        poisson_batches(10, 0.5, key=None, secure=True, rank=0, world_size=2)


def test_secure_loader_needs_no_key():
    data = (torch.arange(20.0)[:, None], torch.arange(20))
    batches = list(PoissonLoader(data, 0.3, key=None, steps=3, secure=True))
    assert len(batches) == 3 and all(b.mask.dtype == torch.bool for b in batches)
    with pytest.raises(TypeError, match="key"):
        PoissonLoader(data, 0.3, key=None, steps=3)

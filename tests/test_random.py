"""Tests for funcdp/random.py: keys are data, derived deterministically; secure draws are N(0, 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from funcdp import random as fdr

# The secure draws come from the OS's entropy, so their statistical tests cannot be seeded; a
# p-value threshold of 1e-6 makes a false failure a one-in-a-million event.
SECURE_P_MIN = 1e-6


def _assert_independent(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two standard normal samples look independent: not equal, and uncorrelated."""
    assert not torch.equal(a, b)
    r = np.corrcoef(a.double().numpy().ravel(), b.double().numpy().ravel())[0, 1]
    # Under independence r ~ N(0, 1/n); 5 standard errors.
    assert abs(r) < 5.0 / np.sqrt(a.numel())


def test_key_is_int64_pair():
    k = fdr.key(0)
    assert k.dtype == torch.int64 and k.shape == (2,)
    assert fdr.split(k, 3).shape == (3, 2) and fdr.split(k, 3).dtype == torch.int64
    assert fdr.fold_in(k, 7).dtype == torch.int64 and fdr.fold_in(k, 7).shape == (2,)


def test_same_seed_same_key_and_draws():
    assert torch.equal(fdr.key(42), fdr.key(42))
    a = fdr.normal(fdr.key(42), (5, 7))
    b = fdr.normal(fdr.key(42), (5, 7))
    assert torch.equal(a, b)
    assert torch.equal(fdr.uniform(fdr.key(3), (10,)), fdr.uniform(fdr.key(3), (10,)))
    assert torch.equal(fdr.split(fdr.key(1), 4), fdr.split(fdr.key(1), 4))
    assert torch.equal(fdr.fold_in(fdr.key(1), 9), fdr.fold_in(fdr.key(1), 9))


def test_normal_does_not_touch_the_global_generator():
    torch.manual_seed(123)
    expected = torch.randn(3)
    torch.manual_seed(123)
    fdr.normal(fdr.key(0), (100,))
    assert torch.equal(torch.randn(3), expected)


def test_normal_dtype_and_shape():
    draw = fdr.normal(fdr.key(0), torch.Size([2, 3]), dtype=torch.float64)
    assert draw.shape == (2, 3) and draw.dtype == torch.float64


def test_different_seeds_give_different_keys():
    keys = {tuple(fdr.key(seed).tolist()) for seed in range(2000)}
    keys |= {tuple(fdr.key(seed).tolist()) for seed in (-1, 2**63 - 1, 2**64 - 2)}
    assert len(keys) == 2000 + 3


def test_seeds_are_taken_modulo_2_to_the_64():
    assert torch.equal(fdr.key(-1), fdr.key(2**64 - 1))
    assert torch.equal(fdr.key(2**64), fdr.key(0))


def test_fold_in_and_split_give_distinct_keys():
    k = fdr.key(0)
    derived = [tuple(fdr.fold_in(k, i).tolist()) for i in range(1000)]
    derived += [tuple(row) for row in fdr.split(k, 100).tolist()]
    derived.append(tuple(k.tolist()))
    assert len(set(derived)) == len(derived)


def test_derived_keys_give_independent_looking_draws():
    n = 20_000
    base = fdr.key(0)
    _assert_independent(fdr.normal(fdr.key(0), (n,)), fdr.normal(fdr.key(1), (n,)))
    _assert_independent(
        fdr.normal(fdr.fold_in(base, 0), (n,)), fdr.normal(fdr.fold_in(base, 1), (n,))
    )
    first, second = fdr.split(base)
    _assert_independent(fdr.normal(first, (n,)), fdr.normal(second, (n,)))
    _assert_independent(fdr.normal(base, (n,)), fdr.normal(first, (n,)))


def test_normal_is_standard_normal():
    draw = fdr.normal(fdr.key(5), (20_000,)).double().numpy()
    assert stats.kstest(draw, "norm").pvalue > 1e-3


def test_split_refuses_bad_num():
    with pytest.raises(ValueError, match="num must be >= 1, got 0"):
        fdr.split(fdr.key(0), 0)


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([1, 2], dtype=torch.int32),
        torch.tensor([1.0, 2.0]),
        torch.tensor([1, 2, 3]),
        torch.tensor([[1, 2]]),
        [1, 2],
        7,
        None,
    ],
)
def test_bad_keys_raise_type_error(bad):
    for fn in (
        lambda: fdr.split(bad),
        lambda: fdr.fold_in(bad, 0),
        lambda: fdr.normal(bad, (2,)),
        lambda: fdr.uniform(bad, (2,)),
        lambda: fdr.generator(bad),
    ):
        with pytest.raises(TypeError, match="key must be an int64 tensor of shape \\[2\\]"):
            fn()


@pytest.mark.parametrize("seed", [1.5, "0", True, None])
def test_key_refuses_non_int_seed(seed):
    with pytest.raises(TypeError, match="seed must be an int"):
        fdr.key(seed)


def test_secure_key_differs_per_call():
    keys = [fdr.secure_key() for _ in range(20)]
    assert all(k.dtype == torch.int64 and k.shape == (2,) for k in keys)
    assert len({tuple(k.tolist()) for k in keys}) == 20


def test_secure_normal_is_standard_normal_and_fresh():
    n = 40_000
    a = fdr.secure_normal((n,), dtype=torch.float64)
    b = fdr.secure_normal((n,), dtype=torch.float64)
    _assert_independent(a, b)
    for draw in (a, b):
        assert stats.kstest(draw.numpy(), "norm").pvalue > SECURE_P_MIN
        # (n - 1) s^2 ~ chi2(n - 1) for sd 1.
        chi2 = (n - 1) * draw.var().item()
        assert stats.chi2.sf(chi2, n - 1) > SECURE_P_MIN / 2
        assert stats.chi2.cdf(chi2, n - 1) > SECURE_P_MIN / 2


def test_secure_normal_dtype_and_shape():
    draw = fdr.secure_normal((3, 4))
    assert draw.shape == (3, 4) and draw.dtype == torch.float32
    assert torch.isfinite(draw).all()


def test_secure_uniform_is_uniform_inside_the_open_interval_and_fresh():
    first, second = fdr.secure_uniform(20000), fdr.secure_uniform(20000)
    assert first.dtype == torch.float64 and ((first > 0) & (first < 1)).all()
    assert stats.kstest(first.numpy(), "uniform").pvalue > 1e-6
    assert not torch.equal(first, second)

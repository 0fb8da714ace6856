"""Tests for the torch strategy optimization's building blocks against dense computations."""

from __future__ import annotations

import pytest
import torch

from funcdp import mf
from funcdp.mf.optimize import prefix_sum_loss, sqrt_coefficients, toeplitz_inverse

_DTYPE = torch.float64


def _lower_toeplitz(coefficients: torch.Tensor, steps: int) -> torch.Tensor:
    """The dense C [steps, steps] of a banded strategy with these coefficients."""
    kept = tuple(float(v) for v in coefficients[:steps])
    return mf.BandedStrategy(steps, 1, 1, kept).strategy_matrix()


def _decreasing(length: int, seed: int) -> torch.Tensor:
    """1 followed by positive, decreasing coefficients: the optimizers' domain."""
    ratios = torch.rand(length - 1, generator=torch.Generator().manual_seed(seed), dtype=_DTYPE)
    return torch.cat([torch.ones(1, dtype=_DTYPE), ratios.cumprod(0)])


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 16, 17, 100, 257])
@pytest.mark.parametrize("length", [1, 3, 8, 300])
def test_toeplitz_inverse_is_the_first_column_of_the_inverse_matrix(steps, length):
    coefficients = _decreasing(length, seed=steps + length)
    dense = torch.linalg.inv(_lower_toeplitz(coefficients, steps))[:, 0]
    torch.testing.assert_close(toeplitz_inverse(coefficients, steps), dense, rtol=0, atol=1e-13)


def test_toeplitz_inverse_of_the_square_root_is_the_square_root_of_the_difference():
    # (1 - x)^(-1/2) inverted is (1 - x)^(1/2): 1, -1/2, -1/8, -1/16, -5/128, ...
    inverse = toeplitz_inverse(sqrt_coefficients(1000), 1000)
    expected = torch.tensor([1.0, -0.5, -0.125, -0.0625, -5.0 / 128], dtype=_DTYPE)
    torch.testing.assert_close(inverse[:5], expected, rtol=0, atol=1e-15)
    # Its first n coefficients sum to the n-th of (1 - x)^(-1/2) (divide by 1 - x).
    torch.testing.assert_close(inverse.sum(), sqrt_coefficients(1000)[-1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps, separation, participations", [
    (1, 1, 1), (6, 1, 6), (6, 2, 3), (7, 2, 2), (12, 5, 3), (12, 12, 1), (30, 4, 100),
])  # fmt: skip
def test_prefix_sum_loss_equals_the_dense_formula(steps, separation, participations):
    coefficients = _decreasing(5, seed=steps)
    matrix = _lower_toeplitz(coefficients, steps)
    prefix = torch.tril(torch.ones(steps, steps, dtype=_DTYPE))
    error = (prefix @ torch.linalg.inv(matrix)).square().sum()
    rows = range(0, min(steps, participations * separation), separation)
    sensitivity = matrix[:, list(rows)].sum(1).norm()
    loss = prefix_sum_loss(
        toeplitz_inverse(coefficients, steps),
        coefficients,
        min_separation=separation,
        max_participations=participations,
    )
    torch.testing.assert_close(loss, error * sensitivity**2, rtol=1e-12, atol=0)

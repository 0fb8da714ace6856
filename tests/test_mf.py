"""funcdp.mf: streaming noise against the dense form, sensitivities against brute force and
closed forms, and optimized strategies against DP-SGD and the tree."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from funcdp import mf
from funcdp.mf.optimize import sqrt_coefficients
from funcdp.mf.sensitivity import (
    cyclic_sensitivity,
    min_separation_sensitivity,
    toeplitz_sensitivity,
)


def brute_force_sensitivity(c: torch.Tensor, b: int, k: int) -> float:
    """max over b-separated sets S (|S| <= k) of sum_{i, j in S} |X_ij|, square-rooted."""
    gram = (c.T @ c).abs()
    n = gram.shape[0]
    best = 0.0
    for size in range(1, k + 1):
        for chosen in itertools.combinations(range(n), size):
            if all(j - i >= b for i, j in itertools.pairwise(chosen)):
                index = torch.tensor(chosen)
                best = max(best, float(gram[index][:, index].sum()))
    return math.sqrt(best)


def prefix_loss(strategy) -> float:
    n = strategy.steps
    workload = torch.ones(n, n, dtype=torch.float64).tril()
    return float((workload @ strategy.inverse_matrix()).square().sum()) * strategy.noise_scale**2


@pytest.fixture(scope="module")
def strategies():
    return {
        "banded": mf.banded(37, 4, min_separation=5),
        "banded_wide": mf.banded(37, 6, min_separation=3),
        "blt": mf.blt(37, 3, min_separation=9),
        "tree": mf.tree(37),
    }


@pytest.mark.parametrize("name", ["banded", "banded_wide", "blt", "tree"])
def test_streaming_noise_equals_dense_inverse(strategies, name):
    strategy = strategies[name]
    n = strategy.steps
    z = torch.randn(n, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state = strategy.stream_init(z[0])
    streamed = []
    for t in range(n):
        y, state = strategy.stream_step(state, z[t], t)
        streamed.append(y)
    dense = torch.einsum("ts,sij->tij", strategy.inverse_matrix(), z)
    torch.testing.assert_close(torch.stack(streamed), dense, rtol=0, atol=1e-6)
    # The inverse is the inverse of the strategy matrix.
    eye = torch.eye(n, dtype=torch.float64)
    product = strategy.strategy_matrix() @ strategy.inverse_matrix()
    torch.testing.assert_close(product, eye, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["banded", "blt"])
@pytest.mark.parametrize("shape", [(), (0, 3)], ids=["scalar", "empty"])
def test_streaming_handles_scalar_and_empty_leaves(strategies, name, shape):
    strategy = strategies[name]
    z = torch.randn(strategy.steps, *shape, dtype=torch.float64)
    state, streamed = strategy.stream_init(z[0]), []
    for t in range(strategy.steps):
        y, state = strategy.stream_step(state, z[t], t)
        streamed.append(y)
    dense = (strategy.inverse_matrix() @ z.reshape(strategy.steps, -1)).reshape(z.shape)
    torch.testing.assert_close(torch.stack(streamed), dense, rtol=0, atol=1e-6)


def test_stream_state_is_small(strategies):
    like = torch.zeros(5, 7)
    assert strategies["banded"].stream_init(like).shape == (3, 5, 7)  # bands - 1
    assert strategies["blt"].stream_init(like).shape == (3, 5, 7)  # buffers
    assert strategies["tree"].stream_init(like).shape == (6, 5, 7)  # levels of 37 steps


@pytest.mark.parametrize("name", ["banded", "banded_wide", "blt", "tree"])
@pytest.mark.parametrize("b, k", [(1, 1), (3, 2), (4, 3), (2, 5)])
def test_sensitivity_against_brute_force(strategies, name, b, k):
    strategy = strategies[name]
    n = 12
    c = strategy.strategy_matrix(n)
    exact = brute_force_sensitivity(c, b, k)
    bound = min_separation_sensitivity(c, min_separation=b, max_participations=k)
    assert bound >= exact * (1 - 1e-12)
    if name != "tree":  # Toeplitz, non-negative and non-increasing: the lemma is exact
        coefficients = c[:, 0]
        lemma = toeplitz_sensitivity(coefficients, n, min_separation=b, max_participations=k)
        assert lemma == pytest.approx(exact, rel=1e-12)
    cyclic = cyclic_sensitivity(c, min_separation=b, max_participations=k)
    assert cyclic <= exact * (1 + 1e-12)


@given(
    entries=st.lists(st.floats(-2, 2), min_size=28, max_size=28),
    b=st.integers(1, 4),
    k=st.integers(1, 3),
)
def test_bound_never_below_brute_force(entries, b, k):
    n = 7
    c = torch.zeros(n, n, dtype=torch.float64)
    rows, cols = torch.tril_indices(n, n)
    c[rows, cols] = torch.tensor(entries, dtype=torch.float64)
    k = min(k, math.ceil(n / b))
    exact = brute_force_sensitivity(c, b, k)
    assert min_separation_sensitivity(c, min_separation=b, max_participations=k) >= exact - 1e-9
    assert cyclic_sensitivity(c, min_separation=b, max_participations=k) <= exact + 1e-9


def test_bound_is_exact_for_diagonal_within_separation():
    strategy = mf.BandedStrategy(12, 3, 4, (1.0, 0.5, 0.25))
    c = strategy.strategy_matrix()
    exact = brute_force_sensitivity(c, 3, 4)
    assert min_separation_sensitivity(c, min_separation=3, max_participations=4) == (
        pytest.approx(exact, rel=1e-12)
    )
    assert strategy.sensitivity() == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("b, k", [(1, 1), (1, 16), (4, 4), (5, 2)])
def test_identity_closed_form(b, k):
    identity = mf.banded(16, 1, min_separation=b, max_participations=k)
    assert identity.coefficients == (1.0,)
    assert identity.sensitivity() == pytest.approx(math.sqrt(k))
    assert identity.sensitivity(max_participations=1) == pytest.approx(1.0)
    torch.testing.assert_close(identity.noise_matrix(), math.sqrt(k) * torch.eye(16).double())


@pytest.mark.parametrize("levels", [1, 3, 6])
def test_tree_single_participation_is_sqrt_of_levels(levels):
    steps = 2**levels
    tree = mf.tree(steps)
    # Step 0 lies in one node per level: [0], [0, 1], ..., [0, n).
    assert tree.sensitivity() == pytest.approx(math.sqrt(levels + 1))
    dense = tree.strategy_matrix().square().sum(0).sqrt().max()
    assert float(dense) == pytest.approx(math.sqrt(levels + 1))


def test_noise_matrix_is_normalized_to_unit_sensitivity(strategies):
    for strategy in strategies.values():
        normalized = strategy.strategy_matrix() / strategy.noise_scale
        bound = min_separation_sensitivity(
            normalized,
            min_separation=strategy.min_separation,
            max_participations=strategy.max_participations,
        )
        assert bound <= 1 + 1e-9
        expected = strategy.noise_scale * strategy.inverse_matrix()
        torch.testing.assert_close(strategy.noise_matrix(), expected)


@pytest.mark.parametrize("steps, b", [(64, 64), (128, 16)])
def test_optimized_strategies_beat_dpsgd_and_tree(steps, b):
    identity = prefix_loss(mf.banded(steps, 1, min_separation=b))
    tree = prefix_loss(mf.tree(steps, min_separation=b))
    banded = prefix_loss(mf.banded(steps, min(b, 8), min_separation=b))
    blt = prefix_loss(mf.blt(steps, 3, min_separation=b))
    assert banded < 0.6 * identity
    assert blt < 0.6 * identity
    assert blt < tree and banded < identity
    if b == steps:  # single participation: BLT (near-optimal MF) beats the tree too
        assert blt < 0.5 * tree


def test_optimization_improves_on_its_start():
    steps, bands = 64, 6
    start = mf.BandedStrategy(steps, bands, 11, tuple(float(v) for v in sqrt_coefficients(bands)))
    optimized = mf.banded(steps, bands)
    assert prefix_loss(optimized) < prefix_loss(start)
    two = mf.banded(steps, 2)
    one = mf.banded(steps, 1, min_separation=2)
    assert prefix_loss(two) < prefix_loss(one)


def test_amplification_factor():
    banded = mf.banded(20, 4, min_separation=5)
    column = math.sqrt(sum(c * c for c in banded.coefficients))
    assert banded.amplification_factor() == pytest.approx(banded.noise_scale / column)
    assert banded.noise_scale == pytest.approx(2 * column)  # k = 4 disjoint full columns
    assert mf.banded(20, 4, min_separation=2).amplification_factor() is None
    assert mf.blt(20, 2).amplification_factor() is None


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: mf.banded(10, 11), "bands must be an int in \\[1, 10\\], got 11"),
        (lambda: mf.banded(0, 1), "steps must be a positive int, got 0"),
        (lambda: mf.blt(10, 0), "buffers must be a positive int, got 0"),
        (lambda: mf.tree(10, min_separation=11), "min_separation must be an int in \\[1, 10\\]"),
        (
            lambda: mf.banded(10, 2, max_participations=6),
            "max_participations must be an int in \\[1, ceil\\(steps / min_separation\\) = 5\\]",
        ),
        (lambda: mf.BandedStrategy(10, 2, 5, (2.0, 1.0)), "coefficients must hold"),
        (lambda: mf.BltStrategy(10, 2, 5, (1.5,), (0.1,)), "every theta in \\(0, 1\\)"),
    ],
)
def test_bad_arguments_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()

"""funcdp.mf.choose: the calibrated prefix-sum error and the strategy it picks."""

from __future__ import annotations

import math

import pytest
import torch

import funcdp as fdp
from funcdp import mf
from funcdp.mf.choose import choose_strategy, default_candidates, prefix_sum_error


def _dense_error(strategy, sigma: float) -> float:
    """sigma^2 ||A M||_F^2 / n from the dense noise matrix, A the all-ones lower triangle."""
    m = strategy.noise_matrix()
    workload = torch.ones(len(m), len(m), dtype=torch.float64).tril()
    return sigma**2 * float((workload @ m).square().sum()) / len(m)


@pytest.mark.parametrize(
    "strategy",
    [mf.banded(30, 1), mf.banded(30, 4), mf.banded(30, 5, min_separation=6), mf.blt(30, 3)],
    ids=["identity", "banded", "banded_separated", "blt"],
)
def test_prefix_sum_error_equals_the_dense_form(strategy):
    assert prefix_sum_error(strategy, 0.7) == pytest.approx(_dense_error(strategy, 0.7), rel=1e-9)


def test_identity_error_is_dp_sgds():
    # C = I under every-step participation: s = sqrt(n), so the noise of each step has std
    # sigma sqrt(n) and the prefix sums' mean variance is that times (n + 1) / 2.
    steps, sigma = 30, 0.4
    expected = (sigma * math.sqrt(steps)) ** 2 * (steps + 1) / 2
    assert prefix_sum_error(mf.banded(steps, 1), sigma) == pytest.approx(expected, rel=1e-12)


def test_choice_is_the_brute_force_minimum():
    steps, q, epsilon = 20, 0.1, 2.0
    candidates = [mf.banded(steps, 1), mf.banded(steps, 2), mf.blt(steps, 2, min_separation=10)]
    choice = choose_strategy(
        epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps, candidates=candidates
    )
    brute = []
    for strategy in candidates:
        rate = min(1.0, q * strategy.min_separation)
        sigma = fdp.calibrate_noise(
            target_epsilon=epsilon,
            delta=1e-5,
            sample_rate=rate,
            steps=steps,
            mechanism=mf.mechanism(strategy),
        )
        brute.append((_dense_error(strategy, sigma), sigma, rate, strategy))
    error, sigma, rate, best = min(brute, key=lambda row: row[0])
    assert choice.strategy is best and choice.strategy.bands > 1  # here a band beats DP-SGD
    assert (choice.noise_multiplier, choice.sample_rate) == (sigma, rate)
    assert choice.error == pytest.approx(error, rel=1e-9)
    for (strategy, s, e), (dense, s2, _, strategy2) in zip(choice.errors, brute, strict=True):
        assert strategy is strategy2 and s == s2 and e == pytest.approx(dense, rel=1e-9)


def test_small_epsilon_chooses_dp_sgds_identity():
    # With little budget, amplification over every step beats any correlation: one band.
    choice = choose_strategy(epsilon=0.3, delta=1e-5, sample_rate=0.25, steps=8)
    assert [s.bands for s, _, _ in choice.errors] == [1, 2, 3, 4]
    assert choice.strategy == mf.banded(8, 1) and choice.strategy.min_separation == 1
    assert choice.error < min(e for _, _, e in choice.errors[1:])
    dp_sgd = fdp.calibrate_noise(target_epsilon=0.3, delta=1e-5, sample_rate=0.25, steps=8)
    # the identity's sigma is DP-SGD's over its sensitivity sqrt(n): the same noise
    assert choice.noise_multiplier * math.sqrt(8) == pytest.approx(dp_sgd, rel=1e-3)


def test_default_candidates_keep_each_groups_rate_at_most_one():
    assert [s.bands for s in default_candidates(220, 64 / 1437)] == [1, 2, 3, 4, 6, 8, 12, 16, 22]
    assert [s.bands for s in default_candidates(5, 0.1)] == [1, 2, 3, 4, 5]
    assert [s.bands for s in default_candidates(40, 0.5)] == [1, 2]
    assert [s.bands for s in default_candidates(40, 1.0)] == [1]


def test_refusals_name_the_argument():
    with pytest.raises(ValueError, match="steps=20, got one for 30"):
        choose_strategy(
            epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=20, candidates=[mf.banded(30, 2)]
        )
    with pytest.raises(ValueError, match="at least one strategy"):
        choose_strategy(epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=20, candidates=[])
    with pytest.raises(ValueError, match="sample_rate must be in \\(0, 1\\], got 1.5"):
        choose_strategy(epsilon=1.0, delta=1e-5, sample_rate=1.5, steps=20)
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        choose_strategy(epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=0)
    with pytest.raises(TypeError, match="Toeplitz strategy \\(banded, blt\\), got TreeStrategy"):
        prefix_sum_error(mf.tree(8), 1.0)
    with pytest.raises(TypeError, match="Toeplitz strategies \\(banded, blt\\), got TreeStrategy"):
        choose_strategy(epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=8, candidates=[mf.tree(8)])

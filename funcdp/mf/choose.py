"""`choose_strategy`: the correlated-noise strategy with the smallest calibrated error.

A strategy's noise multiplier depends on its accounting (amplified BandMF composes ceil(n / b)
Poisson-subsampled Gaussians at rate q b; BLT is one Gaussian mechanism over the run), so
strategies compare only after each is calibrated to the same (epsilon, delta). With the
calibrated sigma, SGD at a constant learning rate carries the prefix sums of the noise in its
parameters: the error compared is their mean squared value per coordinate,

    sigma^2 * ||A M||_F^2 / n,   M = s C^-1 (`Strategy.noise_matrix`), A the prefix-sum matrix,

in units of (clip norm / expected batch size)^2 (Denisov et al. 2022; Choquette-Choo et al.
2023). BandMF with one band is DP-SGD, so a candidate list that holds it never yields a choice
predicted worse than DP-SGD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from funcdp.accounting.accountant import Method, calibrate_noise
from funcdp.mf.accounting import mechanism
from funcdp.mf.builders import banded
from funcdp.mf.optimize import prefix_sum_norm
from funcdp.mf.strategies import BandedStrategy, BltStrategy, Strategy

_DTYPE = torch.float64


class Choice(NamedTuple):
    """The chosen strategy, its calibrated noise multiplier and what was compared.

    Attributes:
      strategy: the candidate with the smallest `error`.
      noise_multiplier: sigma for `correlated_noise(sigma, strategy)`, calibrated to the target.
      sample_rate: the rate of each of its cyclic groups, min(1, q * min_separation).
      error: its predicted mean squared prefix-sum noise per coordinate (module docstring).
      errors: (strategy, noise multiplier, error) of every candidate, in the order given.
    """

    strategy: Strategy
    noise_multiplier: float
    sample_rate: float
    error: float
    errors: tuple[tuple[Strategy, float, float], ...]


def prefix_sum_error(strategy: Strategy, noise_multiplier: float) -> float:
    """sigma^2 ||A M||_F^2 / n: the mean squared prefix sum of the strategy's noise per
    coordinate at noise multiplier sigma (clip norm 1). O(n * state) for Toeplitz strategies:
    the first column of C^-1 comes from the noise stream itself, run on a unit impulse.

    Raises:
      TypeError: a strategy that is not Toeplitz (the tree): compare it on its dense form.
    """
    if not isinstance(strategy, BandedStrategy | BltStrategy):
        raise TypeError(
            f"prefix_sum_error takes a Toeplitz strategy (banded, blt), got "
            f"{type(strategy).__name__}"
        )
    norm = float(prefix_sum_norm(_impulse_response(strategy)))
    return noise_multiplier**2 * strategy.noise_scale**2 * norm / strategy.steps


def default_candidates(steps: int, sample_rate: float) -> list[Strategy]:
    """BandMF with 1 (DP-SGD), 2, 3, 4, 6, 8, 12, 16, ... bands, up to floor(1 / q) (so that
    each cyclic group's rate q * bands stays <= 1) and `steps`, the largest always included."""
    most = max(1, min(steps, math.floor(1.0 / sample_rate)))
    bands = {b for b in (1, 2, 3, 4, 6) if b <= most}
    b = 8
    while b <= most:
        bands.update({b, b + b // 2} & set(range(1, most + 1)))
        b *= 2
    bands.add(most)
    return [banded(steps, b) for b in sorted(bands)]


def choose_strategy(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    candidates: Sequence[Strategy] | None = None,
    method: Method = "pld",
) -> Choice:
    """The candidate whose calibrated noise gives the smallest `prefix_sum_error`.

    Each candidate is calibrated under its own accounting (`funcdp.mf.mechanism`, fed by
    `cyclic_poisson_batches(min_separation=strategy.min_separation)` at rate
    min(1, q * min_separation)) to spend `epsilon` at `delta` over `steps` steps; ties go to the
    earlier candidate.

    Args:
      epsilon: the target epsilon, > 0.
      delta: the target delta, in (0, 1).
      sample_rate: q, the rate DP-SGD would sample at (expected batch size / examples).
      steps: the run's steps; every candidate must be built for exactly this many.
      candidates: Toeplitz strategies (`banded`, `blt`); default `default_candidates(steps, q)`.
      method: the accountant, "pld" or "rdp".

    Raises:
      ValueError: an argument outside its range, no candidates, or a candidate built for
        another number of steps (checked before any calibration).
      TypeError: a candidate that is not Toeplitz (the tree).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    candidates = default_candidates(steps, sample_rate) if candidates is None else candidates
    if not candidates:
        raise ValueError("candidates must hold at least one strategy, got none")
    for strategy in candidates:
        if not isinstance(strategy, BandedStrategy | BltStrategy):
            raise TypeError(
                f"candidates must be Toeplitz strategies (banded, blt), got "
                f"{type(strategy).__name__}"
            )
        if strategy.steps != steps:
            raise ValueError(
                f"every candidate must be built for steps={steps}, got one for {strategy.steps}"
            )
    errors, best = [], None
    for strategy in candidates:
        rate = min(1.0, sample_rate * strategy.min_separation)
        sigma = calibrate_noise(
            target_epsilon=epsilon,
            delta=delta,
            sample_rate=rate,
            steps=steps,
            method=method,
            mechanism=mechanism(strategy),
        )
        error = prefix_sum_error(strategy, sigma)
        errors.append((strategy, sigma, error))
        if best is None or error < best[3]:
            best = (strategy, sigma, rate, error)
    return Choice(*best, tuple(errors))


def _impulse_response(strategy: Strategy) -> torch.Tensor:
    """The first column of C^-1: the strategy's stream fed 1, 0, 0, ... (float64)."""
    steps = strategy.steps
    like = torch.zeros(1, dtype=_DTYPE)
    state = strategy.stream_init(like)
    out = torch.empty(steps, dtype=_DTYPE)
    for t in range(steps):
        y, state = strategy.stream_step(state, torch.ones(1, dtype=_DTYPE) * (t == 0), t)
        out[t] = y[0]
    return out

"""`banded`, `blt` and `tree`: strategies for a number of steps, optimized where they can be."""

from __future__ import annotations

import math

from funcdp.mf.optimize import optimize_banded, optimize_blt
from funcdp.mf.sensitivity import check_participation
from funcdp.mf.strategies import BandedStrategy, BltStrategy, TreeStrategy


def banded(
    steps: int,
    bands: int,
    *,
    min_separation: int | None = None,
    max_participations: int | None = None,
) -> BandedStrategy:
    """BandMF: the banded Toeplitz strategy with `bands` diagonals that minimizes the prefix-sum
    loss for `steps` steps (see `funcdp.mf.optimize`); `bands=1` is DP-SGD (C = I).

    Args:
      steps: the number of steps n the strategy serves; a run may not take more.
      bands: the number of non-zero diagonals, in [1, steps]; the noise state holds bands - 1
        copies of the gradient.
      min_separation: b, the fewest steps between two participations of one unit; default
        `bands`, the setting where cyclic Poisson sampling amplifies (Choquette-Choo et al.
        2023, "Amplified BandMF").
      max_participations: k, default ceil(steps / b).

    Raises:
      ValueError: an argument outside its range.
    """
    _check_count("steps", steps)
    if not isinstance(bands, int) or isinstance(bands, bool) or not 1 <= bands <= steps:
        raise ValueError(f"bands must be an int in [1, {steps}], got {bands!r}")
    b, k = _participation(
        steps, bands if min_separation is None else min_separation, max_participations
    )
    coefficients = optimize_banded(steps, bands, min_separation=b, max_participations=k)
    return BandedStrategy(steps, b, k, coefficients)


def blt(
    steps: int,
    buffers: int,
    *,
    min_separation: int | None = None,
    max_participations: int | None = None,
) -> BltStrategy:
    """A buffered linear Toeplitz strategy with `buffers` buffers, optimized for the prefix-sum
    loss over `steps` steps (McMahan, Xu & Zhang 2024).

    Args:
      steps: the number of steps n the strategy serves.
      buffers: d >= 1, the number of buffers (the noise state holds d copies of the gradient).
      min_separation: b; default `steps` (single participation). Its accounting is never
        amplified: the whole run is one Gaussian mechanism.
      max_participations: k, default ceil(steps / b).

    Raises:
      ValueError: an argument outside its range.
    """
    _check_count("steps", steps)
    _check_count("buffers", buffers)
    b, k = _participation(
        steps, steps if min_separation is None else min_separation, max_participations
    )
    thetas, omegas = optimize_blt(steps, buffers, min_separation=b, max_participations=k)
    return BltStrategy(steps, b, k, thetas, omegas)


def tree(
    steps: int, *, min_separation: int | None = None, max_participations: int | None = None
) -> TreeStrategy:
    """The binary-tree strategy of DP-FTRL for `steps` steps (for comparison: it has no free
    coefficients). min_separation defaults to `steps` (single participation)."""
    _check_count("steps", steps)
    b, k = _participation(
        steps, steps if min_separation is None else min_separation, max_participations
    )
    return TreeStrategy(steps, b, k)


def _participation(steps: int, b: int, k: int | None) -> tuple[int, int]:
    k = math.ceil(steps / b) if k is None and isinstance(b, int) and b >= 1 else k
    check_participation(steps, b, k)
    return b, k


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")

"""Numerics of the audit bounds, with numpy and the standard library only (no scipy at run time)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

MAX_EPSILON = 60.0
BISECTION_STEPS = 60


def binomial_pmf(n: int, log_p: float, log_1mp: float) -> np.ndarray:
    """P[Binomial(n, p) = j] for j = 0..n, computed in log space."""
    j = np.arange(n + 1, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        log_pmf = log_choose(n) + times_log(j, log_p) + times_log(n - j, log_1mp)
    return np.exp(log_pmf)


@functools.lru_cache(maxsize=64)
def log_choose(n: int) -> np.ndarray:
    """log C(n, j) for j = 0..n (read-only, cached: bisections reuse it many times)."""
    j = np.arange(n + 1)
    log_factorial = np.concatenate(
        [[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))]
    )
    out = log_factorial[n] - log_factorial[j] - log_factorial[n - j]
    out.setflags(write=False)
    return out


def times_log(count: np.ndarray, log_prob: float) -> np.ndarray:
    """count * log_prob with 0 * log(0) = 0."""
    if log_prob == -math.inf:
        return np.where(count == 0, 0.0, -math.inf)
    return count * log_prob


def largest_true(rejected: Callable[[float], bool]) -> float:
    """The largest eps in [0, MAX_EPSILON] with rejected(eps), assuming it is monotone."""
    if not rejected(0.0):
        return 0.0
    if rejected(MAX_EPSILON):
        return MAX_EPSILON
    low, high = 0.0, MAX_EPSILON
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


def check_confidence(confidence: float) -> None:
    if not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")

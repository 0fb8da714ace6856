"""Sensitivity of a strategy matrix C under participation patterns.

A unit that takes part in the steps of a set S changes the released `C x` by `C u`, where u is
zero outside S and each u_i is a gradient of norm <= 1. Its squared sensitivity is then

    max_S  max_{||g_i|| <= 1}  sum_{i, j in S} X_ij <g_i, g_j>  <=  max_S sum_{i, j in S} |X_ij|

with X = C^T C; the bound is tight when X >= 0 entrywise (all g_i equal). Every function here
returns that bound (Choquette-Choo et al. 2023, "Multi-Epoch Matrix Factorization Mechanisms
for Private Machine Learning", arXiv:2211.06530), so it never under-states the sensitivity.

Participation patterns:
- single participation: S has one element (the largest column norm of C);
- b-min-separation with at most k participations: any two steps of S are >= b apart, |S| <= k;
- cyclic (k, b): S = {i, i + b, ..., i + (k - 1) b} for an offset i < b (fixed-order epochs).
"""

from __future__ import annotations

import math

import torch


def check_participation(steps: int, min_separation: int, max_participations: int) -> None:
    """Raises unless 1 <= min_separation <= steps and 1 <= max_participations <= ceil(steps / b)."""
    if not isinstance(min_separation, int) or not 1 <= min_separation <= steps:
        raise ValueError(f"min_separation must be an int in [1, {steps}], got {min_separation!r}")
    most = math.ceil(steps / min_separation)
    if not isinstance(max_participations, int) or not 1 <= max_participations <= most:
        raise ValueError(
            f"max_participations must be an int in [1, ceil(steps / min_separation) = {most}], "
            f"got {max_participations!r}"
        )


def min_separation_sensitivity(
    strategy_matrix: torch.Tensor, *, min_separation: int, max_participations: int
) -> float:
    """An upper bound on the sensitivity of C under b-min-separation with <= k participations.

    With r_i = max over b-separated sets S' that hold i (|S'| <= k) of sum_{j in S'} |X_ij|,
    sum_{i, j in S} |X_ij| <= sum_{i in S} r_i, and the largest right side over b-separated S is
    found by dynamic programming, as is each r_i: exact for X diagonal within distance b (banded
    C with bands <= b) and for b = 1, k = n (every step), an upper bound otherwise. O(n^2 k).
    """
    gram = (strategy_matrix.T @ strategy_matrix).abs()
    steps = gram.shape[0]
    check_participation(steps, min_separation, max_participations)
    b, k = min_separation, max_participations
    left = _separated_best(gram, b, k)  # [n + 1, R, K]: sets of positions < p
    right = _separated_best(gram.flip(1), b, k)  # the same from the other end
    rows = torch.arange(steps)
    before = left[(rows - b + 1).clamp(min=0), rows]  # [R, K], positions <= i - b
    after = right[(steps - rows - b).clamp(min=0), rows]  # positions >= i + b
    if before.shape[1] == 1:  # no limit on the size of the set
        row_best = gram.diagonal() + before[:, 0] + after[:, 0]
    else:
        sizes = torch.arange(k)  # a on the left, k - 1 - a on the right
        row_best = gram.diagonal() + (before[:, sizes] + after[:, k - 1 - sizes]).amax(1)
    total = _separated_best(row_best[None], b, k)[-1, 0, -1]
    return math.sqrt(float(total))


def cyclic_sensitivity(
    strategy_matrix: torch.Tensor, *, min_separation: int, max_participations: int
) -> float:
    """The sensitivity bound of C under cyclic (k, b) participation: the worst offset i < b of
    S = {i, i + b, ...} (at most k steps), exact where X >= 0 entrywise."""
    gram = (strategy_matrix.T @ strategy_matrix).abs()
    steps = gram.shape[0]
    check_participation(steps, min_separation, max_participations)
    worst = 0.0
    for offset in range(min_separation):
        chosen = torch.arange(offset, steps, min_separation)[:max_participations]
        worst = max(worst, float(gram[chosen][:, chosen].sum()))
    return math.sqrt(worst)


def toeplitz_sensitivity(
    coefficients: torch.Tensor, steps: int, *, min_separation: int, max_participations: int
) -> float | None:
    """The b-min-separation sensitivity of a lower-triangular Toeplitz C with these coefficients.

    For non-negative, non-increasing coefficients the worst pattern is the earliest one,
    {0, b, ..., (k - 1) b}, so the sensitivity is the norm of the sum of those columns of C
    (McMahan, Xu & Zhang 2024, "Hassle-Free Algorithm for Private Learning in Practice: Don't
    Use Tree Aggregation, Use BLTs", arXiv:2405.13763, Theorem 2). O(n k), no n x n matrix.

    Returns:
      the sensitivity, or None when the coefficients are not non-negative and non-increasing
      (the lemma does not apply; use `min_separation_sensitivity` on the dense matrix).
    """
    check_participation(steps, min_separation, max_participations)
    c = coefficients.to(torch.float64)[:steps]
    if bool((c < 0).any()) or bool((c[1:] > c[:-1]).any()):
        return None
    total = torch.zeros(steps, dtype=torch.float64)
    for start in range(0, min(steps, max_participations * min_separation), min_separation):
        length = min(len(c), steps - start)
        total[start : start + length] += c[:length]
    return float(torch.linalg.vector_norm(total))


def _separated_best(weights: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """table[p, r, j]: the largest sum of weights[r] over a set of positions < p, pairwise >= b
    apart, with at most j elements; when k >= ceil(n / b) the size cannot bind, and the table
    has the single column j = 0 meaning "any size"."""
    rows, steps = weights.shape
    limited = k < math.ceil(steps / b)
    table = torch.zeros(steps + 1, rows, k + 1 if limited else 1, dtype=weights.dtype)
    for p in range(steps):
        earlier = table[max(p - b + 1, 0)]
        if limited:  # taking p uses one of the j elements
            take = torch.cat([earlier[:, :1], weights[:, p, None] + earlier[:, :-1]], 1)
        else:
            take = weights[:, p, None] + earlier
        table[p + 1] = torch.maximum(table[p], take)
    return table

"""Empirical lower bounds on epsilon from the outcomes of a membership-inference attack.

An accountant proves an upper bound on epsilon; these functions turn what an attacker achieved
against the running code into a lower bound that holds with the stated confidence. A lower
bound above the accountant's epsilon proves that the code does not do what the proof assumes.

- One run (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run"): m
  canaries, each included independently with probability 1/2; the auditor guesses r of them
  and is right v times. Under (eps, delta)-DP, Theorem 5.2 of the paper bounds
  P[v or more right] by P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta alpha, where alpha
  is the largest mean tail mass max_i P[v - i <= Binomial < v] / i. The lower bound is the
  largest eps at which that p-value is still below 1 - confidence.
- Many runs (Nasr et al. 2023, "Tight Auditing of Differentially Private Machine Learning"):
  Clopper-Pearson upper bounds on the false-positive and false-negative rates of a membership
  test, turned into eps with the hypothesis-testing view of (eps, delta)-DP, or through the
  Gaussian-DP trade-off curve.

The (eps, delta) bounds take delta in [0, 1): delta = 0 bounds pure eps-DP, as Steinke et al.
(2023) report. The Gaussian-DP conversions need delta > 0, since a mu-GDP mechanism with mu > 0
has infinite epsilon at delta = 0.

No scipy at run time: binomial tails are summed in log space from log-factorials, and the
Clopper-Pearson bound is found by bisection on the binomial tail (the beta quantile equals it).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from funcdp._checks import check_delta
from funcdp.audit._numerics import BISECTION_STEPS, binomial_pmf, check_confidence, largest_true
from funcdp.audit.many_run_bounds import (  # noqa: F401 - re-exported: the many-run bounds
    clopper_pearson_upper,
    gaussian_dp_epsilon,
    gaussian_dp_mu_lower_bound,
    many_run_epsilon_lower_bound,
    many_run_gdp_epsilon_lower_bound,
)

_STANDARD_NORMAL = NormalDist()


class GuessOutcome(NamedTuple):
    """The guesses the auditor made from canary scores, and the bound they certify.

    Attributes:
      epsilon_lower_bound: the one-run lower bound on epsilon at the stated confidence.
      num_guesses: how many canaries the auditor guessed (the others were abstentions).
      num_correct: how many guesses were right.
    """

    epsilon_lower_bound: float
    num_guesses: int
    num_correct: int


def one_run_p_value(
    num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, *, delta: float
) -> float:
    """The probability of `num_correct` or more right guesses under (epsilon, delta)-DP.

    This is the bound of Steinke, Nasr & Jagielski (2023, Theorem 5.2): with m canaries each
    included with probability 1/2 and r guesses, P[W >= v] <= P[Binomial(r, p) >= v] +
    2 m delta max_{1 <= i <= v} P[v - i <= Binomial(r, p) < v] / i, with p = e^eps / (1 + e^eps).

    Args:
      num_canaries: m, the number of canaries.
      num_guesses: r, the number of guesses, 0 <= r <= m.
      num_correct: v, the number of right guesses, 0 <= v <= r.
      epsilon: the epsilon of the null hypothesis, >= 0.
      delta: the delta of the null hypothesis, in [0, 1).

    Returns:
      The p-value, capped at 1.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    check_delta(delta, allow_zero=True)
    if num_correct == 0:
        return 1.0
    log_p = -math.log1p(math.exp(-epsilon))
    log_1mp = -epsilon + log_p
    pmf = binomial_pmf(num_guesses, log_p, log_1mp)
    tail = float(pmf[num_correct:].sum())
    below = np.cumsum(pmf[num_correct - 1 :: -1])  # P[v - i <= W < v] for i = 1..v
    alpha = float((below / np.arange(1, num_correct + 1)).max())
    return min(1.0, tail + 2.0 * num_canaries * delta * alpha)


def one_run_epsilon_lower_bound(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    *,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """The largest epsilon the one-run audit rejects at `confidence` (Steinke et al. 2023).

    Each of `num_canaries` canaries was included in the run independently with probability 1/2;
    the auditor guessed membership for `num_guesses` of them and was right `num_correct` times.
    With probability at least `confidence`, the mechanism is not (eps, delta)-DP for any eps
    below the returned value. This is the bisection of the paper's Algorithm 2 on
    `one_run_p_value`.

    Args:
      num_canaries: m >= 1.
      num_guesses: r, 0 <= r <= m.
      num_correct: v, 0 <= v <= r.
      delta: the delta at which to bound epsilon, in [0, 1); 0 bounds pure eps-DP.
      confidence: in (0, 1).

    Returns:
      The lower bound on epsilon, >= 0 (0 when the guesses prove nothing).

    Raises:
      ValueError: counts out of range, delta outside [0, 1) or confidence outside (0, 1).
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    check_delta(delta, allow_zero=True)
    check_confidence(confidence)
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(num_canaries, num_guesses, num_correct, eps, delta=delta) < level

    return largest_true(rejected)


def one_run_ceiling(
    num_canaries: int,
    *,
    delta: float,
    confidence: float = 0.95,
    epsilon: float | None = None,
) -> tuple[float, int]:
    """What the one-run method can certify with `num_canaries` canaries, and at how many guesses.

    With `epsilon=None`: the best bound over r guesses when every guess is right, which no
    audit with this many canaries can exceed. With `epsilon`: the best bound over r when the r
    guesses are right as often as an exactly eps-DP mechanism allows (round(r e^eps / (1 +
    e^eps)) right: randomized response, the idealised attack of the paper's Figure 2).

    Returns:
      `(ceiling, num_guesses)`: the bound, and the number of guesses that reaches it.
    """
    _check_counts(num_canaries, num_canaries, 0)
    accuracy = 1.0 if epsilon is None else 1.0 / (1.0 + math.exp(-epsilon))
    best = (0.0, 0)
    for r in _guess_grid(num_canaries):
        v = min(r, round(r * accuracy))
        bound = one_run_epsilon_lower_bound(num_canaries, r, v, delta=delta, confidence=confidence)
        best = max(best, (bound, r))
    return best


def one_run_gaussian_ceiling(
    num_canaries: int, mu: float, *, delta: float, confidence: float = 0.95
) -> tuple[float, int]:
    """The one-run bound expected against a mu-GDP mechanism with the best number of guesses.

    Models white-box Dirac canaries against a Gaussian mechanism: a canary's score is N(mu, 1)
    when included and N(0, 1) when not (full-batch DP-SGD with noise multiplier sigma over T
    steps has mu = sqrt(T) / sigma). For each k the auditor guesses the k highest scores "in"
    and the k lowest "out", and gets the expected number right; the ceiling is the best bound
    over k. It shows what the one-run method can certify against this mechanism with this many
    canaries, which for the Gaussian mechanism is well below its epsilon (Steinke et al. 2023,
    Section 7).

    Returns:
      `(ceiling, num_guesses)`.
    """
    _check_counts(num_canaries, num_canaries, 0)
    if not 0 <= mu < math.inf:
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    upper_tail = _STANDARD_NORMAL.cdf
    best = (0.0, 0)
    for k in sorted({max(1, r // 2) for r in _guess_grid(num_canaries)}):
        # The threshold t above which the expected number of scores is k.
        low, high = -40.0, 40.0 + mu
        for _ in range(BISECTION_STEPS):
            t = 0.5 * (low + high)
            above = 0.5 * num_canaries * (upper_tail(mu - t) + upper_tail(-t))
            low, high = (t, high) if above > k else (low, t)
        hit, miss = upper_tail(mu - t), upper_tail(-t)
        precision = hit / (hit + miss) if hit + miss > 0 else 1.0
        correct = min(2 * k, round(2 * k * precision))
        bound = one_run_epsilon_lower_bound(
            num_canaries, 2 * k, correct, delta=delta, confidence=confidence
        )
        best = max(best, (bound, 2 * k))
    return best


def guess_from_scores(
    scores: np.ndarray | list[float],
    included: np.ndarray | list[bool],
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: tuple[int, ...] | None = None,
) -> GuessOutcome:
    """Guesses the highest-scoring canaries "in" and the lowest "out"; bounds epsilon.

    For each candidate k, the auditor guesses the k highest scores included, the k lowest
    excluded, and abstains on the rest. Trying several k and keeping the best would overstate
    the confidence, so each k is bounded at confidence 1 - (1 - confidence) / len(candidates)
    (Bonferroni): the best of them holds at `confidence`.

    Args:
      scores: one score per canary, higher meaning "more likely included".
      included: whether each canary was included in the run (the secret the auditor guesses).
      delta: the delta at which to bound epsilon, in [0, 1); 0 bounds pure eps-DP.
      confidence: in (0, 1).
      guess_counts: the candidate k (guesses per side); default a fixed grid of fractions of
        the canaries, chosen before seeing the scores.

    Returns:
      The best `GuessOutcome` over the candidates.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    if scores.shape != included.shape:
        raise ValueError(
            f"scores and included must have the same length, got {scores.shape} and {included.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    m = len(scores)
    candidates = _default_guess_counts(m) if guess_counts is None else tuple(guess_counts)
    if not candidates or any(not 1 <= k <= m // 2 for k in candidates):
        raise ValueError(
            f"guess_counts must be non-empty, each k in [1, {m // 2}], got {candidates!r}"
        )
    check_confidence(confidence)
    each = 1.0 - (1.0 - confidence) / len(candidates)
    # A stable sort on the negated scores breaks ties by index, which the auditor cannot steer.
    order = np.argsort(-scores, kind="stable")
    best = GuessOutcome(0.0, 0, 0)
    for k in candidates:
        correct = int(included[order[:k]].sum() + (~included[order[m - k :]]).sum())
        bound = one_run_epsilon_lower_bound(m, 2 * k, correct, delta=delta, confidence=each)
        if bound > best.epsilon_lower_bound:
            best = GuessOutcome(bound, 2 * k, correct)
    return best


def _guess_grid(num_canaries: int) -> list[int]:
    grid = {max(1, round(num_canaries * f)) for f in np.geomspace(1e-3, 1.0, 40)}
    return sorted(r for r in grid if r <= num_canaries)


def _default_guess_counts(num_canaries: int) -> tuple[int, ...]:
    fractions = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5)
    return tuple(sorted({max(1, round(num_canaries * f / 2)) for f in fractions}))


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    for name, value in (
        ("num_canaries", num_canaries),
        ("num_guesses", num_guesses),
        ("num_correct", num_correct),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_canaries < 1:
        raise ValueError(f"num_canaries must be >= 1, got {num_canaries}")
    if not 0 <= num_guesses <= num_canaries:
        raise ValueError(
            f"num_guesses must be in [0, num_canaries={num_canaries}], got {num_guesses}"
        )
    if not 0 <= num_correct <= num_guesses:
        raise ValueError(
            f"num_correct must be in [0, num_guesses={num_guesses}], got {num_correct}"
        )

"""Many-run lower bounds on epsilon (Nasr et al. 2023, "Tight Auditing of Differentially Private
Machine Learning"): Clopper-Pearson upper bounds on the false-positive and false-negative rates
of a membership test, turned into epsilon with the hypothesis-testing view of (eps, delta)-DP or
through the Gaussian-DP trade-off curve (Dong, Roth & Su 2019). See `funcdp.audit.bounds`.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from funcdp._checks import check_delta
from funcdp.audit._numerics import BISECTION_STEPS, binomial_pmf, check_confidence, largest_true

_STANDARD_NORMAL = NormalDist()


def clopper_pearson_upper(successes: int, trials: int, level: float) -> float:
    """The exact one-sided upper confidence bound on a binomial rate at `level`.

    The smallest p with P[Binomial(trials, p) <= successes] <= level: the (1 - level) quantile
    of Beta(successes + 1, trials - successes), found by bisection on the binomial tail.
    """
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if not isinstance(successes, int) or not 0 <= successes <= trials:
        raise ValueError(f"successes must be an int in [0, {trials}], got {successes!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if successes == trials:
        return 1.0

    def cdf(p: float) -> float:
        pmf = binomial_pmf(trials, math.log(p), math.log1p(-p))
        return float(pmf[: successes + 1].sum())

    low, high = 0.0, 1.0  # cdf(low) > level >= cdf(high)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if cdf(mid) > level:
            low = mid
        else:
            high = mid
    return high


def many_run_epsilon_lower_bound(
    false_positives: int,
    false_negatives: int,
    num_trials: int,
    *,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """A lower bound on epsilon from a membership test repeated over many runs (Nasr et al. 2023).

    `num_trials` runs were trained with the canary and `num_trials` without; the test said "in"
    for `false_positives` runs without it and "out" for `false_negatives` runs with it. Any
    (eps, delta)-DP mechanism has FPR + e^eps FNR >= 1 - delta and the mirror inequality, so
    with Clopper-Pearson upper bounds on both rates (each at level (1 - confidence) / 2),
    eps >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR)), with delta in
    [0, 1) (0 bounds pure eps-DP).

    Returns:
      The lower bound, >= 0, holding with probability at least `confidence`.

    Raises:
      ValueError: counts out of range, delta outside [0, 1) or confidence outside (0, 1).
    """
    fpr, fnr = _error_rate_bounds(false_positives, false_negatives, num_trials, delta, confidence)
    candidates = [0.0]
    for a, b in ((fpr, fnr), (fnr, fpr)):
        if 1.0 - delta - b > 0.0:
            candidates.append(math.log((1.0 - delta - b) / a))
    return max(candidates)


def gaussian_dp_mu_lower_bound(
    false_positives: int, false_negatives: int, num_trials: int, *, confidence: float = 0.95
) -> float:
    """The smallest mu-GDP consistent with the observed error rates (Nasr et al. 2023).

    A mu-GDP test has FNR >= Phi(Phi^-1(1 - FPR) - mu), so mu >= Phi^-1(1 - FPR) - Phi^-1(FNR),
    taken at the Clopper-Pearson upper bounds of both rates.
    """
    fpr, fnr = _error_rate_bounds(false_positives, false_negatives, num_trials, 0.5, confidence)
    inv = _STANDARD_NORMAL.inv_cdf
    return max(0.0, inv(1.0 - fpr) - inv(fnr))


def gaussian_dp_epsilon(mu: float, *, delta: float) -> float:
    """The epsilon at `delta` of a mu-GDP mechanism (Dong, Roth & Su 2019, Corollary 2.13).

    Solves delta = Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2) for eps by bisection.

    Raises:
      ValueError: delta outside (0, 1) (at delta = 0 the epsilon of mu-GDP is infinite) or mu
        not >= 0.
    """
    _check_gdp_delta(delta)
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0, got {mu!r}")
    if mu == 0:
        return 0.0
    cdf = _STANDARD_NORMAL.cdf

    def delta_of(eps: float) -> float:
        return cdf(-eps / mu + mu / 2) - math.exp(eps) * cdf(-eps / mu - mu / 2)

    return largest_true(lambda eps: delta_of(eps) > delta)


def many_run_gdp_epsilon_lower_bound(
    false_positives: int,
    false_negatives: int,
    num_trials: int,
    *,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """The epsilon at `delta` of the lower bound on mu from `gaussian_dp_mu_lower_bound`.

    Tighter than `many_run_epsilon_lower_bound` for mechanisms whose trade-off curve is Gaussian
    (DP-SGD), as in Nasr et al. (2023); it assumes that shape, so it is an estimate rather than
    a proof for other mechanisms. `delta` must be in (0, 1): at delta = 0 the epsilon of mu-GDP
    is infinite.
    """
    _check_gdp_delta(delta)
    mu = gaussian_dp_mu_lower_bound(
        false_positives, false_negatives, num_trials, confidence=confidence
    )
    return gaussian_dp_epsilon(mu, delta=delta)


def _error_rate_bounds(
    false_positives: int, false_negatives: int, num_trials: int, delta: float, confidence: float
) -> tuple[float, float]:
    check_delta(delta, allow_zero=True)
    check_confidence(confidence)
    level = (1.0 - confidence) / 2.0
    fpr = clopper_pearson_upper(false_positives, num_trials, level)
    fnr = clopper_pearson_upper(false_negatives, num_trials, level)
    return fpr, fnr


def _check_gdp_delta(delta: float) -> None:
    """Raises unless 0 < delta < 1, and says why delta = 0 is refused."""
    if isinstance(delta, (int, float)) and not isinstance(delta, bool) and delta == 0:
        raise ValueError(
            f"delta must be in (0, 1) for a mu-GDP bound, got {delta!r}: a mu-GDP mechanism "
            "with mu > 0 has infinite epsilon at delta = 0"
        )
    check_delta(delta)

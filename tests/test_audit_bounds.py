"""Tests for funcdp/audit/bounds.py: the bounds agree with scipy and keep their confidence."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from funcdp.audit import bounds

FIXED = settings(derandomize=True, max_examples=40, deadline=None)


def scipy_one_run_p_value(m, r, v, eps, delta):
    """Theorem 5.2 of Steinke, Nasr & Jagielski (2023), written with scipy's binomial."""
    p = math.exp(eps) / (1 + math.exp(eps))
    tail = stats.binom.sf(v - 1, r, p)
    alpha = max(
        (stats.binom.cdf(v - 1, r, p) - stats.binom.cdf(v - i - 1, r, p)) / i
        for i in range(1, v + 1)
    )
    return min(1.0, tail + 2 * m * delta * alpha)


@pytest.mark.parametrize(
    "m, r, v, eps, delta",
    [
        (1000, 100, 100, 3.0, 1e-5),
        (1000, 1000, 881, 1.5, 1e-5),
        (500, 200, 150, 0.7, 1e-6),
        (50, 20, 11, 0.0, 1e-3),
        (2000, 300, 290, 4.0, 1e-4),
    ],
)
def test_one_run_p_value_matches_scipy(m, r, v, eps, delta):
    ours = bounds.one_run_p_value(m, r, v, eps, delta=delta)
    assert ours == pytest.approx(scipy_one_run_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-14)


@given(
    m=st.integers(2, 400),
    data=st.data(),
    eps=st.floats(0.0, 6.0),
    delta=st.sampled_from([0.0, 1e-6, 1e-4, 1e-2]),
)
@FIXED
def test_one_run_p_value_matches_scipy_everywhere(m, data, eps, delta):
    r = data.draw(st.integers(1, m))
    v = data.draw(st.integers(1, r))
    ours = bounds.one_run_p_value(m, r, v, eps, delta=delta)
    assert ours == pytest.approx(scipy_one_run_p_value(m, r, v, eps, delta), rel=1e-8, abs=1e-13)


@pytest.mark.parametrize(
    "m, r, v", [(1000, 100, 100), (1000, 200, 180), (1000, 1000, 881), (300, 60, 45)]
)
def test_one_run_bound_is_the_largest_rejected_epsilon(m, r, v):
    delta, confidence = 1e-5, 0.95
    eps = bounds.one_run_epsilon_lower_bound(m, r, v, delta=delta, confidence=confidence)
    assert eps > 0
    # Rejected at eps, not rejected just above it (up to float rounding of the two sums).
    assert scipy_one_run_p_value(m, r, v, eps, delta) < 1 - confidence + 1e-12
    assert scipy_one_run_p_value(m, r, v, eps + 1e-6, delta) > 1 - confidence


def test_all_correct_bound_has_a_closed_form_when_delta_is_negligible():
    # P[Binomial(r, p) >= r] = p^r = 0.05  =>  eps = log(p / (1 - p)), p = 0.05^(1/r).
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        expected = math.log(p / (1 - p))
        got = bounds.one_run_epsilon_lower_bound(1000, r, r, delta=1e-15, confidence=0.95)
        assert got == pytest.approx(expected, rel=1e-6)


def test_one_run_bound_is_zero_when_guesses_prove_nothing():
    assert bounds.one_run_epsilon_lower_bound(1000, 100, 50, delta=1e-5) == 0.0
    assert bounds.one_run_epsilon_lower_bound(1000, 0, 0, delta=1e-5) == 0.0


@given(m=st.integers(10, 500), data=st.data())
@FIXED
def test_one_run_bound_is_monotone(m, data):
    r = data.draw(st.integers(2, m))
    v = data.draw(st.integers(1, r - 1))
    base = bounds.one_run_epsilon_lower_bound(m, r, v, delta=1e-5)
    assert bounds.one_run_epsilon_lower_bound(m, r, v + 1, delta=1e-5) >= base
    assert bounds.one_run_epsilon_lower_bound(m, r, v, delta=1e-5, confidence=0.99) <= base
    assert bounds.one_run_epsilon_lower_bound(m, r, v, delta=1e-3) <= base


@pytest.mark.parametrize("eps, r", [(1.0, 100), (2.0, 400), (4.0, 1000)])
def test_one_run_bound_keeps_its_confidence_against_randomized_response(eps, r):
    # An exactly eps-DP mechanism: each guess is right with probability e^eps / (1 + e^eps).
    # The exact probability (over the number right) that the bound exceeds eps is at most 5%.
    p = math.exp(eps) / (1 + math.exp(eps))
    mean = round(r * p)
    right = range(mean, r + 1)  # below the mean the bound stays far below eps
    exceeds = [v for v in right if bounds.one_run_epsilon_lower_bound(1000, r, v, delta=1e-5) > eps]
    probability = sum(stats.binom.pmf(v, r, p) for v in exceeds)
    assert 0.0 < probability <= 0.05


def test_one_run_ceilings():
    m, delta = 1000, 1e-5
    ceiling, guesses = bounds.one_run_ceiling(m, delta=delta)
    assert guesses == m
    assert ceiling == pytest.approx(bounds.one_run_epsilon_lower_bound(m, m, m, delta=delta))
    for eps in (1.0, 2.0, 4.0):
        rr, _ = bounds.one_run_ceiling(m, delta=delta, epsilon=eps)
        assert 0.5 * eps < rr < min(eps, ceiling)
    # More canaries certify more.
    assert bounds.one_run_ceiling(4000, delta=delta)[0] > ceiling


def test_gaussian_ceiling_grows_with_mu_and_stays_below_the_mechanisms_epsilon():
    m, delta = 1000, 1e-5
    values = [
        bounds.one_run_gaussian_ceiling(m, mu, delta=delta)[0] for mu in (0.0, 0.5, 1.0, 2.0, 4.0)
    ]
    assert values[0] == 0.0
    assert values == sorted(values)
    for mu, value in zip((0.5, 1.0, 2.0, 4.0), values[1:], strict=True):
        assert 0 < value < bounds.gaussian_dp_epsilon(mu, delta=delta)


@pytest.mark.parametrize(
    "k, n, level",
    [(0, 10, 0.025), (3, 10, 0.025), (17, 200, 0.05), (199, 200, 0.01), (50, 1000, 0.025)],
)
def test_clopper_pearson_matches_scipy_beta(k, n, level):
    expected = stats.beta.ppf(1 - level, k + 1, n - k)
    assert bounds.clopper_pearson_upper(k, n, level) == pytest.approx(expected, rel=1e-9)
    assert bounds.clopper_pearson_upper(n, n, level) == 1.0


@given(n=st.integers(1, 300), data=st.data(), level=st.floats(0.001, 0.3))
@FIXED
def test_clopper_pearson_matches_scipy_beta_everywhere(n, data, level):
    k = data.draw(st.integers(0, n - 1))
    expected = stats.beta.ppf(1 - level, k + 1, n - k)
    assert bounds.clopper_pearson_upper(k, n, level) == pytest.approx(expected, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize(
    "fp, fn, n", [(0, 0, 100), (5, 40, 1000), (100, 100, 1000), (3, 0, 50), (400, 450, 1000)]
)
def test_many_run_bound_matches_an_independent_computation(fp, fn, n):
    delta, confidence = 1e-5, 0.95
    level = (1 - confidence) / 2
    fpr = stats.beta.ppf(1 - level, fp + 1, n - fp)
    fnr = stats.beta.ppf(1 - level, fn + 1, n - fn)
    expected = max(0.0, math.log((1 - delta - fnr) / fpr), math.log((1 - delta - fpr) / fnr))
    got = bounds.many_run_epsilon_lower_bound(fp, fn, n, delta=delta, confidence=confidence)
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_gaussian_dp_conversion_matches_scipy_and_dp_accounting():
    from dp_accounting import GaussianDpEvent
    from dp_accounting.pld import PLDAccountant

    for sigma in (0.5, 1.0, 2.0):
        mu = 1 / sigma
        eps = bounds.gaussian_dp_epsilon(mu, delta=1e-5)
        delta = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(
            -eps / mu - mu / 2
        )
        assert delta == pytest.approx(1e-5, rel=1e-6)
        accountant = PLDAccountant()
        accountant.compose(GaussianDpEvent(sigma))
        assert eps == pytest.approx(accountant.get_epsilon(1e-5), rel=2e-3)


def test_gaussian_dp_mu_matches_scipy():
    fp, fn, n, confidence = 30, 200, 1000, 0.95
    level = (1 - confidence) / 2
    fpr = stats.beta.ppf(1 - level, fp + 1, n - fp)
    fnr = stats.beta.ppf(1 - level, fn + 1, n - fn)
    expected = stats.norm.ppf(1 - fpr) - stats.norm.ppf(fnr)
    assert bounds.gaussian_dp_mu_lower_bound(fp, fn, n) == pytest.approx(expected, rel=1e-7)
    eps = bounds.many_run_gdp_epsilon_lower_bound(fp, fn, n, delta=1e-5)
    assert eps == pytest.approx(bounds.gaussian_dp_epsilon(expected, delta=1e-5), rel=1e-6)
    assert bounds.many_run_gdp_epsilon_lower_bound(500, 500, 1000, delta=1e-5) == 0.0


def test_guess_from_scores_guesses_the_extremes_with_bonferroni():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    # Perfectly separated scores: every guess is right at every k.
    perfect = bounds.guess_from_scores(included.astype(float), included, delta=1e-5)
    k = perfect.num_guesses // 2
    assert perfect.num_correct == perfect.num_guesses
    counts = bounds._default_guess_counts(1000)
    assert k == max(counts)
    expected = bounds.one_run_epsilon_lower_bound(
        1000, 2 * k, 2 * k, delta=1e-5, confidence=1 - 0.05 / len(counts)
    )
    assert perfect.epsilon_lower_bound == pytest.approx(expected)
    # Scores that carry no information certify nothing, or almost nothing.
    noise = bounds.guess_from_scores(rng.normal(size=1000), included, delta=1e-5)
    assert noise.epsilon_lower_bound < 0.3
    # One candidate k: guesses exactly the k highest and k lowest.
    scores = rng.normal(size=1000) + included
    one = bounds.guess_from_scores(scores, included, delta=1e-5, guess_counts=(50,))
    order = np.argsort(-scores)
    right = included[order[:50]].sum() + (~included[order[-50:]]).sum()
    assert (one.num_guesses, one.num_correct) == (100, right)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_correct must be in"):
        bounds.one_run_epsilon_lower_bound(10, 5, 6, delta=1e-5)
    with pytest.raises(ValueError, match="num_guesses must be in"):
        bounds.one_run_epsilon_lower_bound(10, 11, 6, delta=1e-5)
    with pytest.raises(ValueError, match="delta must be in"):
        bounds.one_run_epsilon_lower_bound(10, 5, 5, delta=1.0)
    with pytest.raises(ValueError, match="confidence must be in"):
        bounds.one_run_epsilon_lower_bound(10, 5, 5, delta=1e-5, confidence=1.0)
    with pytest.raises(ValueError, match="successes must be"):
        bounds.many_run_epsilon_lower_bound(11, 0, 10, delta=1e-5)
    with pytest.raises(ValueError, match="same length"):
        bounds.guess_from_scores([1.0, 2.0], [True], delta=1e-5)
    with pytest.raises(ValueError, match="guess_counts"):
        bounds.guess_from_scores([1.0, 2.0], [True, False], delta=1e-5, guess_counts=(2,))
    with pytest.raises(ValueError, match="mu must be"):
        bounds.gaussian_dp_epsilon(-1.0, delta=1e-5)


# --- delta = 0: pure DP, as Steinke, Nasr & Jagielski (2023) report ------------------------


@pytest.mark.parametrize("m, r, v", [(1000, 100, 100), (1000, 1000, 881), (300, 60, 45)])
def test_one_run_bound_at_delta_zero_is_finite_and_no_lower_than_at_positive_delta(m, r, v):
    pure = bounds.one_run_epsilon_lower_bound(m, r, v, delta=0.0)
    assert math.isfinite(pure)
    assert pure >= bounds.one_run_epsilon_lower_bound(m, r, v, delta=1e-5) > 0
    # The largest rejected epsilon of Theorem 5.2 with its delta term gone.
    assert scipy_one_run_p_value(m, r, v, pure, 0.0) < 0.05 + 1e-12
    assert scipy_one_run_p_value(m, r, v, pure + 1e-6, 0.0) > 0.05


def test_all_correct_bound_at_delta_zero_is_the_closed_form():
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        got = bounds.one_run_epsilon_lower_bound(1000, r, r, delta=0.0, confidence=0.95)
        assert got == pytest.approx(math.log(p / (1 - p)), rel=1e-9)


def test_one_run_ceiling_and_guesses_accept_delta_zero():
    ceiling, guesses = bounds.one_run_ceiling(1000, delta=0.0)
    assert math.isfinite(ceiling) and guesses == 1000
    assert ceiling >= bounds.one_run_ceiling(1000, delta=1e-5)[0]
    gaussian, _ = bounds.one_run_gaussian_ceiling(1000, 2.0, delta=0.0)
    assert math.isfinite(gaussian)
    assert gaussian >= bounds.one_run_gaussian_ceiling(1000, 2.0, delta=1e-5)[0] > 0
    included = np.arange(1000) % 2 == 0
    pure = bounds.guess_from_scores(included.astype(float), included, delta=0.0)
    assert math.isfinite(pure.epsilon_lower_bound)
    approx = bounds.guess_from_scores(included.astype(float), included, delta=1e-5)
    assert pure.epsilon_lower_bound >= approx.epsilon_lower_bound > 0


@pytest.mark.parametrize("fp, fn, n", [(5, 40, 1000), (3, 0, 50), (0, 0, 100)])
def test_many_run_bound_at_delta_zero_matches_an_independent_computation(fp, fn, n):
    level = (1 - 0.95) / 2
    fpr = stats.beta.ppf(1 - level, fp + 1, n - fp)
    fnr = stats.beta.ppf(1 - level, fn + 1, n - fn)
    expected = max(0.0, math.log((1 - fnr) / fpr), math.log((1 - fpr) / fnr))
    pure = bounds.many_run_epsilon_lower_bound(fp, fn, n, delta=0.0)
    assert math.isfinite(pure)
    assert pure == pytest.approx(expected, rel=1e-7, abs=1e-9)
    assert pure >= bounds.many_run_epsilon_lower_bound(fp, fn, n, delta=1e-5) > 0


def test_gaussian_dp_refuses_delta_zero_and_says_why():
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\).*infinite epsilon"):
        bounds.gaussian_dp_epsilon(1.0, delta=0.0)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\).*infinite epsilon"):
        bounds.many_run_gdp_epsilon_lower_bound(5, 40, 1000, delta=0.0)


@pytest.mark.parametrize("delta", [-0.1, 1.0, 1.5, math.nan, True])
def test_bounds_refuse_delta_outside_zero_one_naming_delta(delta):
    with pytest.raises(ValueError, match=r"delta must be in \[0, 1\)"):
        bounds.one_run_p_value(100, 10, 10, 1.0, delta=delta)
    with pytest.raises(ValueError, match=r"delta must be in \[0, 1\)"):
        bounds.one_run_epsilon_lower_bound(100, 10, 10, delta=delta)
    with pytest.raises(ValueError, match=r"delta must be in \[0, 1\)"):
        bounds.one_run_ceiling(100, delta=delta)
    with pytest.raises(ValueError, match=r"delta must be in \[0, 1\)"):
        bounds.guess_from_scores([1.0, 0.0], [True, False], delta=delta)
    with pytest.raises(ValueError, match=r"delta must be in \[0, 1\)"):
        bounds.many_run_epsilon_lower_bound(5, 40, 1000, delta=delta)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        bounds.gaussian_dp_epsilon(1.0, delta=delta)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        bounds.many_run_gdp_epsilon_lower_bound(5, 40, 1000, delta=delta)

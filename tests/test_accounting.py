"""Tests for funcdp/accounting/: the ledger, epsilon, dpsgd_epsilon and calibrate_noise."""

from __future__ import annotations

import math

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from funcdp.accounting import Ledger, LedgerRecord, calibrate_noise, dpsgd_epsilon, epsilon
from funcdp.accounting.accountant import PLD_DISCRETIZATION

# dp_accounting's accountants at funcdp's settings (PLD at its documented discretization)
ACCOUNTANTS = {
    "rdp": rdp.RdpAccountant,
    "pld": lambda: pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION),
}

# (noise_multiplier, sample_rate, steps, delta); moderate settings keep PLD fast.
SETTINGS = [
    (1.1, 0.01, 100, 1e-5),
    (2.0, 0.05, 50, 1e-5),
    (1.5, 0.02, 200, 1e-6),
    (0.9, 0.004, 300, 1e-5),
]


def _dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dpa.DpEvent:
    return dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier)), steps
    )


def _reference_epsilon(event: dpa.DpEvent, delta: float, method: str) -> float:
    return ACCOUNTANTS[method]().compose(event).get_epsilon(delta)


# ---------------------------------------------------------------- epsilon vs dp_accounting


@pytest.mark.parametrize("method", ["rdp", "pld"])
@pytest.mark.parametrize("noise_multiplier,sample_rate,steps,delta", SETTINGS)
def test_epsilon_equals_dp_accounting_exactly(noise_multiplier, sample_rate, steps, delta, method):
    expected = _reference_epsilon(_dpsgd_event(noise_multiplier, sample_rate, steps), delta, method)
    ledger = Ledger().record(noise_multiplier, sample_rate, steps)
    assert epsilon(ledger, delta=delta, method=method) == expected
    assert (
        dpsgd_epsilon(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            method=method,
        )
        == expected
    )


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_full_batch_epsilon_is_the_plain_gaussian_composition(method):
    # q = 1 means every example is in every batch: no amplification, no Poisson wrapper.
    expected = _reference_epsilon(
        dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(3.0), 5), 1e-5, method
    )
    assert (
        dpsgd_epsilon(noise_multiplier=3.0, sample_rate=1.0, steps=5, delta=1e-5, method=method)
        == expected
    )


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_two_record_ledger_equals_the_composed_event(method):
    ledger = Ledger().record(1.1, 0.01, 100).record(2.0, 0.05, 50)
    event = dpa.ComposedDpEvent([_dpsgd_event(1.1, 0.01, 100), _dpsgd_event(2.0, 0.05, 50)])
    spent = epsilon(ledger, delta=1e-5, method=method)
    assert spent == _reference_epsilon(event, 1e-5, method)
    if method == "rdp":  # composition spends more than either part alone
        assert spent > dpsgd_epsilon(
            noise_multiplier=1.1, sample_rate=0.01, steps=100, delta=1e-5, method=method
        )
        assert spent > dpsgd_epsilon(
            noise_multiplier=2.0, sample_rate=0.05, steps=50, delta=1e-5, method=method
        )


def test_rdp_matches_opacus_reference_figure():
    # Opacus's RDP accountant gives 7.329 for this classic setting.
    assert dpsgd_epsilon(
        noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, method="rdp"
    ) == pytest.approx(7.329, rel=1e-3)


@pytest.mark.parametrize(
    "noise_multiplier,sample_rate,steps,delta",
    [
        (1.5, 0.04, 2250, 1e-5),
        (1.1, 0.01, 1000, 1e-5),
        (2.0, 0.1, 300, 1e-5),
        (0.8, 0.004, 5000, 1e-6),
    ],
)
def test_rdp_matches_opacus_accountant(noise_multiplier, sample_rate, steps, delta):
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    expected = accountant.get_epsilon(delta)
    actual = dpsgd_epsilon(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        method="rdp",
    )
    assert actual == pytest.approx(expected, rel=1e-3)


def test_pld_is_no_looser_than_rdp():
    assert dpsgd_epsilon(
        noise_multiplier=1.1, sample_rate=0.01, steps=100, delta=1e-5, method="pld"
    ) < dpsgd_epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=100, delta=1e-5, method="rdp")


def test_empty_ledger_spends_nothing():
    assert epsilon(Ledger(), delta=1e-5) == 0.0
    assert epsilon(Ledger(), delta=1e-5, method="pld") == 0.0
    assert dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=0, delta=1e-5) == 0.0


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_noiseless_step_spends_infinite_epsilon(method):
    assert (
        dpsgd_epsilon(noise_multiplier=0.0, sample_rate=0.01, steps=10, delta=1e-5, method=method)
        == math.inf
    )
    mixed = Ledger().record(1.1, 0.01, 100).record(0.0, 0.01, 1)
    assert epsilon(mixed, delta=1e-5, method=method) == math.inf


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    assert dpsgd_epsilon(
        noise_multiplier=1.0, sample_rate=0.01, steps=200, delta=1e-5
    ) > dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5)
    assert dpsgd_epsilon(
        noise_multiplier=2.0, sample_rate=0.01, steps=100, delta=1e-5
    ) < dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5)


# ---------------------------------------------------------------- the ledger


def test_record_merges_equal_records_and_keeps_distinct_ones():
    ledger = Ledger().record(1.0, 0.01, 3).record(2.0, 0.01).record(1, 0.01, 2)
    assert ledger.records == (LedgerRecord(1.0, 0.01, 5), LedgerRecord(2.0, 0.01, 1))
    assert ledger.steps == 6
    assert Ledger().record(1.0, 0.02).record(1.0, 0.01).records == (
        LedgerRecord(1.0, 0.02, 1),
        LedgerRecord(1.0, 0.01, 1),
    )


@settings(max_examples=50, derandomize=True, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.01, 0.1, 1.0]), st.integers(0, 5)
        ),
        max_size=20,
    )
)
def test_record_merge_invariants(entries):
    ledger = Ledger()
    for noise_multiplier, sample_rate, steps in entries:
        ledger = ledger.record(noise_multiplier, sample_rate, steps)
    keys = [(rec.noise_multiplier, rec.sample_rate) for rec in ledger.records]
    assert len(keys) == len(set(keys)) == len({(s, q) for s, q, _ in entries})
    for rec in ledger.records:
        expected = sum(
            n for s, q, n in entries if (s, q) == (rec.noise_multiplier, rec.sample_rate)
        )
        assert rec.steps == expected
    assert ledger.steps == sum(n for _, _, n in entries)


def test_ledger_is_immutable():
    ledger = Ledger().record(1.0, 0.01, 3)
    longer = ledger.record(1.0, 0.01)
    assert ledger.records == (LedgerRecord(1.0, 0.01, 3),)
    assert longer.records == (LedgerRecord(1.0, 0.01, 4),)
    assert isinstance(ledger.records, tuple)
    with pytest.raises(AttributeError):
        ledger.records = ()
    with pytest.raises(AttributeError):
        ledger.records[0].steps = 10


@pytest.mark.parametrize(
    "args,name",
    [
        ((-1.0, 0.01), "noise_multiplier"),
        ((math.nan, 0.01), "noise_multiplier"),
        ((math.inf, 0.01), "noise_multiplier"),
        (("1.0", 0.01), "noise_multiplier"),
        ((1.0, 0.0), "sample_rate"),
        ((1.0, 1.5), "sample_rate"),
        ((1.0, -0.1), "sample_rate"),
        ((1.0, math.nan), "sample_rate"),
        ((1.0, 0.01, -1), "steps"),
        ((1.0, 0.01, 1.5), "steps"),
    ],
)
def test_record_rejects_bad_input(args, name):
    ledger = Ledger().record(1.0, 0.01)
    with pytest.raises(ValueError, match=name):
        ledger.record(*args)
    assert ledger.records == (LedgerRecord(1.0, 0.01, 1),)


def test_to_dp_event_structure():
    ledger = Ledger().record(1.1, 0.01, 100).record(0.0, 0.5, 2).record(3.0, 1.0, 4)
    assert ledger.to_dp_event() == dpa.ComposedDpEvent(
        [
            _dpsgd_event(1.1, 0.01, 100),
            dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.5, dpa.NonPrivateDpEvent()), 2),
            dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(3.0), 4),
        ]
    )
    assert Ledger().to_dp_event() == dpa.ComposedDpEvent([])


def test_to_dp_event_composes_with_other_mechanisms():
    ledger = Ledger().record(1.1, 0.01, 100)
    other = dpa.GaussianDpEvent(5.0)
    combined = dpa.ComposedDpEvent([ledger.to_dp_event(), other])
    expected = dpa.ComposedDpEvent([_dpsgd_event(1.1, 0.01, 100), other])
    assert _reference_epsilon(combined, 1e-5, "rdp") == _reference_epsilon(expected, 1e-5, "rdp")


# ---------------------------------------------------------------- calibrate_noise


@pytest.mark.parametrize(
    "sample_rate, steps, target", [(1.0, 100_000, 3.0), (0.001, 5000, 3.0), (0.01, 100, 50.0)]
)
def test_calibrate_noise_never_runs_pld_far_below_the_answer(
    sample_rate, steps, target, monkeypatch
):
    """PLD's cost grows without bound as sigma falls below the answer (at q = 1 and 100k steps,
    sigma 1 took minutes): the search gives PLD only sigmas above half the answer."""
    import funcdp.accounting.accountant as accountant

    tried = []
    original = accountant.epsilon

    def recording(ledger, *, delta, method="pld"):
        if method == "pld":
            tried.append(ledger.records[0].noise_multiplier)
        return original(ledger, delta=delta, method=method)

    monkeypatch.setattr(accountant, "epsilon", recording)
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=sample_rate, steps=steps)
    assert tried and min(tried) >= sigma / 2


@pytest.mark.parametrize(
    "target,delta,sample_rate,steps", [(3.0, 1e-5, 0.01, 100), (1.0, 1e-6, 0.02, 500)]
)
def test_calibrate_noise_meets_target_tightly(target, delta, sample_rate, steps):
    sigma = calibrate_noise(
        target_epsilon=target, delta=delta, sample_rate=sample_rate, steps=steps, method="rdp"
    )
    spent = dpsgd_epsilon(
        noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta, method="rdp"
    )
    assert spent <= target
    assert spent >= target * (1 - 1e-3)
    assert (
        dpsgd_epsilon(
            noise_multiplier=sigma * 0.99,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            method="rdp",
        )
        > target
    )


# ---------------------------------------------------------------- keyword-only arguments
# delta and sample_rate both lie in (0, 1): a positional swap would pass every range check.


def test_positional_calls_raise_type_error():
    ledger = Ledger().record(1.1, 0.01, 100)
    with pytest.raises(TypeError, match="positional"):
        epsilon(ledger, 1e-5)
    with pytest.raises(TypeError, match="positional"):
        epsilon(ledger, 1e-5, "rdp")
    with pytest.raises(TypeError, match="positional"):
        dpsgd_epsilon(1.1, 0.01, 1000, 1e-5)
    with pytest.raises(TypeError, match="positional"):
        dpsgd_epsilon(1.1, 1e-5, 1000, 0.01)  # the swap that returned 0.0
    with pytest.raises(TypeError, match="positional"):
        calibrate_noise(3.0, 1e-5, 0.01, 1000)
    with pytest.raises(TypeError, match="positional"):
        calibrate_noise(3.0, 0.01, 1e-5, 1000)  # the swap that returned a too-small sigma


# Values the positional API returned before it became keyword only (commit 653a49b,
# dp_accounting 0.6.0); PLD's at funcdp's PLD_DISCRETIZATION, 1e-3 since PLD became the default
# (at dp_accounting's default 1e-4 they were 0.91978, 1.03060 and 1.390594: 0.03% lower). PLD's
# sigma is 1e-7 below that API's 1.3905938197058048 since its search is bracketed by PLD itself
# instead of RDP's sigma (2026-11-29; the search stops within a relative 1e-4 of the smallest).
@pytest.mark.parametrize(
    "method,spent_by_ledger,spent_by_dpsgd,sigma",
    [
        ("rdp", 1.1740784485544362, 1.3953302581597133, 1.4932076247290818),
        ("pld", 0.9199578578864734, 1.0309533799295343, 1.3905936854214416),
    ],
)
def test_keyword_calls_give_the_values_of_the_positional_api(
    method, spent_by_ledger, spent_by_dpsgd, sigma
):
    ledger = Ledger().record(1.1, 0.01, 100).record(2.0, 0.05, 50)
    assert epsilon(ledger, delta=1e-5, method=method) == pytest.approx(spent_by_ledger, rel=1e-9)
    spent = dpsgd_epsilon(
        noise_multiplier=1.1, sample_rate=0.01, steps=300, delta=1e-6, method=method
    )
    assert spent == pytest.approx(spent_by_dpsgd, rel=1e-9)
    calibrated = calibrate_noise(
        target_epsilon=3.0, delta=1e-5, sample_rate=1.0, steps=1, method=method
    )
    assert calibrated == pytest.approx(sigma, rel=1e-9)
    one_step = dict(sample_rate=1.0, steps=1, delta=1e-5, method=method)
    assert dpsgd_epsilon(noise_multiplier=calibrated, **one_step) <= 3.0
    assert dpsgd_epsilon(noise_multiplier=calibrated * (1 - 2e-4), **one_step) > 3.0


def test_keyword_calibrate_noise_gives_the_positional_apis_sigma_under_subsampling():
    sigma = calibrate_noise(
        target_epsilon=2.0, delta=1e-5, sample_rate=0.02, steps=500, method="rdp"
    )
    assert sigma == pytest.approx(1.260582230003853, rel=1e-9)


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, math.nan])
def test_bad_delta_raises(delta):
    ledger = Ledger().record(1.0, 0.01)
    with pytest.raises(ValueError, match="delta"):
        epsilon(ledger, delta=delta)
    with pytest.raises(ValueError, match="delta"):
        epsilon(Ledger(), delta=delta)
    with pytest.raises(ValueError, match="delta"):
        dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=delta)
    with pytest.raises(ValueError, match="delta"):
        calibrate_noise(target_epsilon=1.0, delta=delta, sample_rate=0.01, steps=10)


@pytest.mark.parametrize("sample_rate", [0.0, -0.5, 1.0001, math.nan])
def test_bad_sample_rate_raises(sample_rate):
    with pytest.raises(ValueError, match="sample_rate"):
        dpsgd_epsilon(noise_multiplier=1.0, sample_rate=sample_rate, steps=10, delta=1e-5)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=sample_rate, steps=10)


def test_negative_noise_multiplier_raises():
    with pytest.raises(ValueError, match="noise_multiplier"):
        dpsgd_epsilon(noise_multiplier=-0.1, sample_rate=0.01, steps=10, delta=1e-5)


def test_bad_method_raises():
    ledger = Ledger().record(1.0, 0.01)
    with pytest.raises(ValueError, match="method"):
        epsilon(ledger, delta=1e-5, method="gdp")
    with pytest.raises(ValueError, match="method"):
        dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5, method="RDP")
    with pytest.raises(ValueError, match="method"):
        calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=10, method="gdp")


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
    ],
)
def test_calibrate_noise_bad_args(kwargs, name):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        calibrate_noise(**args)


def test_epsilon_needs_a_ledger():
    with pytest.raises(TypeError, match="ledger"):
        epsilon([(1.0, 0.01, 10)], delta=1e-5)


def test_epsilon_warns_when_the_ledger_holds_non_poisson_steps():
    poisson = Ledger().record(1.0, 0.1, 10)
    shuffled = Ledger().record(1.0, 0.1, 10, poisson=False)
    assert shuffled.records[0].poisson is False and shuffled != poisson
    with pytest.warns(UserWarning, match="assumes Poisson sampling"):
        spent = epsilon(shuffled, delta=1e-5)
    assert spent == epsilon(poisson, delta=1e-5)
    merged = shuffled.record(1.0, 0.1, 5, poisson=False).record(1.0, 0.1, 1)
    assert [(r.steps, r.poisson) for r in merged.records] == [(15, False), (1, True)]


@pytest.mark.parametrize("steps", [True, 0, -3, 2.0])
def test_calibrate_noise_refuses_steps_that_are_not_a_positive_int(steps):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=steps)

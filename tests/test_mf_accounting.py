"""Accounting of correlated noise: the ledger's events against dp_accounting, the refused
sampler/strategy pairs, calibrate_noise and budget with a strategy."""

from __future__ import annotations

import io
import math

import dp_accounting as dpa
import pytest
import torch
from dp_accounting import pld, rdp

import funcdp as fdp
from funcdp import mf
from funcdp.accounting import Ledger, LedgerRecord, Mechanism, calibrate_noise, epsilon
from funcdp.accounting.accountant import PLD_DISCRETIZATION
from funcdp.transforms import correlated_noise

DELTA = 1e-5


def _reference(event: dpa.DpEvent, method: str) -> float:
    accountant = (
        rdp.RdpAccountant()
        if method == "rdp"
        else pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    )
    return accountant.compose(event).get_epsilon(DELTA)


def _ledger_of(strategy, *, sigma, sample_rate, steps, min_separation=None):
    """The ledger that `steps` updates of a chain with correlated noise and account keep."""
    chain = fdp.chain(
        fdp.clip(1.0),
        fdp.aggregate(),
        correlated_noise(sigma, strategy),
        fdp.account(sample_rate, min_separation=min_separation or strategy.min_separation),
    )
    params = {"w": torch.zeros(2)}
    state = chain.init(params)
    for t in range(steps):
        _, state = chain.update(
            {"w": torch.zeros(1, 2)},
            state,
            params,
            key=fdp.random.key(t),
            mask=torch.ones(1, dtype=bool),
        )
    (ledger,) = [s.ledger for s in state if isinstance(s, fdp.AccountState)]
    return ledger


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_amplified_bandmf_equals_dp_accounting_on_its_event(method):
    strategy = mf.banded(40, 4, min_separation=5)  # 8 participations, bands <= b
    ledger = _ledger_of(strategy, sigma=0.6, sample_rate=0.2, steps=23)
    factor = strategy.amplification_factor()
    column = math.sqrt(sum(c * c for c in strategy.coefficients))
    assert factor == pytest.approx(strategy.noise_scale / column)
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(0.2, dpa.GaussianDpEvent(0.6 * factor)), math.ceil(23 / 5)
    )
    assert ledger.to_dp_event() == dpa.ComposedDpEvent([event])
    assert epsilon(ledger, delta=DELTA, method=method) == _reference(event, method)


@pytest.mark.parametrize("b", [1, 4])
def test_bandmf_with_one_band_is_dpsgd(b):
    steps, sigma, q = 24, 0.5, 0.1
    strategy = mf.banded(steps, 1, min_separation=b)
    k = math.ceil(steps / b)
    ledger = _ledger_of(strategy, sigma=sigma, sample_rate=q, steps=steps)
    # The identity's noise is sigma * sqrt(k) per step: DP-SGD at that multiplier, every
    # unit in ceil(steps / b) Poisson steps.
    dpsgd = fdp.dpsgd_epsilon(
        noise_multiplier=sigma * math.sqrt(k), sample_rate=q, steps=k, delta=DELTA
    )
    assert epsilon(ledger, delta=DELTA) == pytest.approx(dpsgd, rel=1e-12)
    chain = fdp.chain(
        fdp.clip(1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(sigma * math.sqrt(k)),
        fdp.account(q, min_separation=b),
    )
    state = chain.init({"w": torch.zeros(1)})
    for t in range(steps):
        _, state = chain.update(
            {"w": torch.zeros(1, 1)}, state, key=fdp.random.key(t), mask=torch.ones(1, dtype=bool)
        )
    assert epsilon(state[-1].ledger, delta=DELTA) == pytest.approx(dpsgd, rel=1e-12)


@pytest.mark.parametrize(
    "build",
    [
        lambda: mf.blt(20, 2, min_separation=5),
        lambda: mf.tree(20),
        lambda: mf.banded(20, 4, min_separation=2),
    ],
    ids=["blt", "tree", "banded_wide"],
)
def test_unamplified_strategies_are_one_gaussian_per_run(build):
    strategy = build()
    assert strategy.amplification_factor() is None
    ledger = _ledger_of(strategy, sigma=3.0, sample_rate=0.3, steps=7)
    event = dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(3.0), 1)
    assert ledger.to_dp_event() == dpa.ComposedDpEvent([event])
    assert epsilon(ledger, delta=DELTA, method="pld") == _reference(event, "pld")
    # A second run of the same strategy is a second Gaussian release.
    twice = Ledger().record(3.0, 0.3, 2 * strategy.steps, mechanism=ledger.records[0].mechanism)
    assert twice.to_dp_event() == dpa.ComposedDpEvent(
        [dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(3.0), 2)]
    )


def test_unamplified_sensitivity_covers_every_participation():
    # sigma relative to the whole pattern: the noise of the tree with 4 participations.
    strategy = mf.tree(16, min_separation=4)
    assert strategy.noise_scale == pytest.approx(strategy.sensitivity(min_separation=4))
    assert strategy.noise_scale > strategy.sensitivity(max_participations=1)


@pytest.mark.parametrize(
    "strategy, account_kwargs, match",
    [
        (
            mf.banded(20, 4),
            {},
            "sampler's min_separation=1 must equal the strategy's min_separation=4",
        ),
        (mf.tree(20), {"min_separation": 5}, "must equal the strategy's min_separation=20"),
        (
            mf.blt(20, 2, min_separation=5, max_participations=2),
            {"min_separation": 5},
            "normalized for max_participations=2, but Poisson sampling",
        ),
        (
            mf.banded(20, 1, min_separation=1),
            {"poisson": False},
            "needs \\(cyclic\\) Poisson batches",
        ),
    ],
)
def test_unaccountable_pairs_are_refused_when_the_chain_is_built(strategy, account_kwargs, match):
    with pytest.raises(ValueError, match=match):
        fdp.chain(
            fdp.clip(1.0),
            fdp.aggregate(),
            correlated_noise(1.0, strategy),
            fdp.account(0.1, **account_kwargs),
        )


def test_account_refuses_bad_min_separation():
    with pytest.raises(ValueError, match="min_separation must be an int >= 1, got 0"):
        fdp.account(0.1, min_separation=0)
    with pytest.raises(ValueError, match="needs poisson=True"):
        fdp.account(0.1, min_separation=2, poisson=False)


@pytest.mark.parametrize(
    "build, method",
    [
        (lambda: mf.banded(30, 3), "rdp"),
        (lambda: mf.blt(30, 2, min_separation=3), "rdp"),
        (lambda: mf.blt(30, 2, min_separation=3), "pld"),  # PLD of amplified steps is slower
    ],
    ids=["bandmf-rdp", "blt-rdp", "blt-pld"],
)
def test_calibrate_noise_hits_its_target_for_a_strategy(build, method):
    strategy = build()
    mechanism = mf.mechanism(strategy)
    sigma = calibrate_noise(
        target_epsilon=2.0,
        delta=DELTA,
        sample_rate=0.2,
        steps=30,
        method=method,
        mechanism=mechanism,
    )
    spent = epsilon(
        Ledger().record(sigma, 0.2, 30, mechanism=mechanism), delta=DELTA, method=method
    )
    assert spent <= 2.0
    below = Ledger().record(sigma * 0.99, 0.2, 30, mechanism=mechanism)
    assert epsilon(below, delta=DELTA, method=method) > 2.0


def test_budget_reads_the_correlated_ledger():
    strategy = mf.blt(10, 2, min_separation=2)
    spent = epsilon(Ledger().record(2.0, 0.1, 1, mechanism=mf.mechanism(strategy)), delta=DELTA)
    chain = fdp.chain(
        fdp.clip(1.0),
        fdp.aggregate(),
        correlated_noise(2.0, strategy),
        fdp.account(0.1, min_separation=2),
        fdp.budget(max_epsilon=spent * 0.9, delta=DELTA),
    )
    state = chain.init({"w": torch.zeros(1)})
    with pytest.raises(fdp.BudgetExceededError):
        chain.update(
            {"w": torch.zeros(1, 1)}, state, key=fdp.random.key(0), mask=torch.ones(1, dtype=bool)
        )


def test_records_load_with_weights_only_and_old_records_read_as_dpsgd():
    ledger = Ledger().record(1.0, 0.1, 3).record(2.0, 0.1, 5, mechanism=Mechanism(4, 40, True, 1.5))
    buffer = io.BytesIO()
    torch.save(ledger, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == ledger
    old = LedgerRecord(1.0, 0.1, 3)  # a record saved before the mechanism fields existed
    assert old.mechanism == Mechanism() and old == ledger.records[0]


@pytest.mark.parametrize(
    "mechanism, match",
    [
        (Mechanism(0), "min_separation must be an int >= 1, got 0"),
        (Mechanism(1, -1), "horizon must be an int >= 0, got -1"),
        (Mechanism(1, 0, False), "un-amplified mechanism needs its horizon"),
        (Mechanism(1, 5, True, 0.0), "participation_factor must be a finite number > 0"),
    ],
)
def test_bad_mechanisms_are_refused(mechanism, match):
    with pytest.raises(ValueError, match=match):
        Ledger().record(1.0, 0.1, mechanism=mechanism)
    with pytest.raises(ValueError, match=match):
        calibrate_noise(
            target_epsilon=1.0, delta=DELTA, sample_rate=0.1, steps=10, mechanism=mechanism
        )

"""Tests for funcdp/transforms/accounting.py: account records each step; budget refuses overspending."""

from __future__ import annotations

import math

import pytest
import torch

import funcdp as fdp
from funcdp import random as fdr
from funcdp.accounting import Ledger, LedgerRecord

SIGMA, RATE, DELTA = 1.0, 0.05, 1e-5


def _per_example(batch: int = 4) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(batch, 3, generator=gen), "b": torch.randn(batch, generator=gen)}


def _privatizer(*tail, sigma: float = SIGMA):
    return fdp.chain(
        fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(sigma), fdp.account(RATE), *tail
    )


def _steps(privatizer, state, count: int, *, start: int = 0):
    for t in range(start, start + count):
        _, state = privatizer.update(_per_example(), state, key=fdr.fold_in(fdr.key(0), t))
    return state


def test_account_records_each_update_merged():
    privatizer = _privatizer()
    state = privatizer.init(None)
    assert state[3] == fdp.AccountState(Ledger())
    state = _steps(privatizer, state, 3)
    assert state[3] == fdp.AccountState(Ledger((LedgerRecord(SIGMA, RATE, 3),)))
    assert fdp.epsilon(state[3].ledger, delta=DELTA) == pytest.approx(
        fdp.dpsgd_epsilon(noise_multiplier=SIGMA, sample_rate=RATE, steps=3, delta=DELTA)
    )


def test_account_reads_sigma_from_the_noise_upstream():
    privatizer = fdp.chain(
        fdp.clip(2.0), fdp.aggregate(), fdp.gaussian_noise(0.6), fdp.normalize(8), fdp.account(0.25)
    )
    state = _steps(privatizer, privatizer.init(None), 2)
    assert state[4].ledger == Ledger((LedgerRecord(0.6, 0.25, 2),))


def test_account_passes_the_gradient_unchanged(trees_equal):
    with_account = _privatizer()
    without = fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(SIGMA))
    key = fdr.key(3)
    out, _ = with_account.update(_per_example(), with_account.init(None), key=key)
    expected, _ = without.update(_per_example(), without.init(None), key=key)
    trees_equal(out, expected)


def test_zero_noise_is_recorded_and_costs_infinite_epsilon():
    privatizer = _privatizer(sigma=0.0)
    state = _steps(privatizer, privatizer.init(None), 1)
    assert state[3].ledger == Ledger((LedgerRecord(0.0, RATE, 1),))
    assert fdp.epsilon(state[3].ledger, delta=DELTA) == math.inf


def test_state_unchanged_when_a_step_raises():
    privatizer = _privatizer()
    state = _steps(privatizer, privatizer.init(None), 2)
    snapshot = state[3]
    with pytest.raises(ValueError, match="mask"):
        privatizer.update(
            _per_example(), state, key=fdr.key(0), mask=torch.ones(3, dtype=torch.bool)
        )
    assert state[3] is snapshot and state[3].ledger.steps == 2


def _max_epsilon_between(steps: int) -> float:
    """A budget that allows `steps` steps and refuses the next one."""
    allowed = fdp.dpsgd_epsilon(noise_multiplier=SIGMA, sample_rate=RATE, steps=steps, delta=DELTA)
    refused = fdp.dpsgd_epsilon(
        noise_multiplier=SIGMA, sample_rate=RATE, steps=steps + 1, delta=DELTA
    )
    return (allowed + refused) / 2


def test_budget_allows_steps_under_and_refuses_the_step_over():
    max_epsilon = _max_epsilon_between(3)
    privatizer = _privatizer(fdp.budget(max_epsilon, delta=DELTA))
    state = privatizer.init(None)
    assert state[4] == ()  # no ledger of its own: it reads account's
    state = _steps(privatizer, state, 3)
    assert state[3].ledger.steps == 3
    with pytest.raises(fdp.BudgetExceededError, match=r"epsilon=.*over the budget max_epsilon="):
        privatizer.update(_per_example(), state, key=fdr.key(99))
    # Nothing was recorded: the state is the one after step 3, and the refusal repeats.
    assert state[3].ledger.steps == 3
    with pytest.raises(fdp.BudgetExceededError):
        privatizer.update(_per_example(), state, key=fdr.key(100))


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_budget_refuses_the_first_step_over_after_many_without_running_the_accountant_each_time(
    method, monkeypatch
):
    allowed = 200
    max_epsilon = (
        fdp.dpsgd_epsilon(
            noise_multiplier=SIGMA, sample_rate=RATE, steps=allowed, delta=DELTA, method=method
        )
        + fdp.dpsgd_epsilon(
            noise_multiplier=SIGMA, sample_rate=RATE, steps=allowed + 1, delta=DELTA, method=method
        )
    ) / 2
    privatizer = _privatizer(fdp.budget(max_epsilon, delta=DELTA, method=method))
    calls = []
    original = fdp.transforms.accounting.epsilon
    monkeypatch.setattr(
        fdp.transforms.accounting,
        "epsilon",
        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs),
    )
    state = _steps(privatizer, privatizer.init(None), allowed)
    assert state[3].ledger.steps == allowed
    assert len(calls) < 40  # a frontier search, not one accounting per step
    with pytest.raises(fdp.BudgetExceededError):
        privatizer.update(_per_example(), state, key=fdr.key(99))


def test_budget_follows_a_run_that_changes_its_noise():
    """A second record (sigma 2 after 5 steps at sigma 1) grows; refusals match the accountant."""
    ledger = Ledger().record(SIGMA, RATE, 5)
    allowed = 60
    max_epsilon = (
        sum(
            fdp.epsilon(ledger.record(2.0, RATE, steps), delta=DELTA)
            for steps in (allowed, allowed + 1)
        )
        / 2
    )
    budget = fdp.budget(max_epsilon, delta=DELTA)
    privatizer = fdp.chain(
        fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(2.0), fdp.account(RATE), budget
    )
    state = privatizer.init(None)
    state = (*state[:3], fdp.AccountState(ledger), *state[4:])  # resumed after sigma 1
    state = _steps(privatizer, state, allowed)
    assert state[3].ledger == ledger.record(2.0, RATE, allowed)
    with pytest.raises(fdp.BudgetExceededError):
        privatizer.update(_per_example(), state, key=fdr.key(99))


def test_budget_refuses_the_first_step_if_it_is_already_over():
    privatizer = _privatizer(
        fdp.budget(
            0.5 * fdp.dpsgd_epsilon(noise_multiplier=SIGMA, sample_rate=RATE, steps=1, delta=DELTA),
            delta=DELTA,
        )
    )
    with pytest.raises(fdp.BudgetExceededError):
        privatizer.update(_per_example(), privatizer.init(None), key=fdr.key(0))


def test_budget_with_pld_accounting():
    # One PLD step is allowed with 1% headroom; two steps spend ~15% more.
    one_step = fdp.dpsgd_epsilon(
        noise_multiplier=SIGMA, sample_rate=RATE, steps=1, delta=DELTA, method="pld"
    )
    privatizer = _privatizer(fdp.budget(1.01 * one_step, delta=DELTA, method="pld"))
    state = _steps(privatizer, privatizer.init(None), 1)
    assert state[3].ledger.steps == 1
    with pytest.raises(fdp.BudgetExceededError):
        privatizer.update(_per_example(), state, key=fdr.key(1))


def test_budget_refuses_zero_noise():
    privatizer = _privatizer(fdp.budget(100.0, delta=DELTA), sigma=0.0)
    with pytest.raises(fdp.BudgetExceededError, match="epsilon=inf"):
        privatizer.update(_per_example(), privatizer.init(None), key=fdr.key(0))


def test_account_and_budget_refuse_to_run_outside_a_chain():
    for transform in (fdp.account(RATE), fdp.budget(1.0, delta=DELTA)):
        with pytest.raises(ValueError, match=r"inside chain"):
            transform.update({"a": torch.zeros(2)}, transform.init(None))


@pytest.mark.parametrize("rate", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, "0.1", None])
def test_bad_sample_rate_raises(rate):
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\], got"):
        fdp.account(rate)


@pytest.mark.parametrize("max_epsilon", [0, -1.0, math.nan, math.inf, True, None])
def test_bad_max_epsilon_raises(max_epsilon):
    with pytest.raises(ValueError, match=r"max_epsilon must be a finite number > 0, got"):
        fdp.budget(max_epsilon, delta=DELTA)


@pytest.mark.parametrize("delta", [0, 0.0, 1, 1.0, -1e-5, math.nan, True, None])
def test_bad_delta_raises(delta):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got"):
        fdp.budget(1.0, delta=delta)


def test_sample_rate_one_is_allowed():
    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0), fdp.account(1))
    state = _steps(privatizer, privatizer.init(None), 1)
    assert state[3].ledger == Ledger((LedgerRecord(1.0, 1.0, 1),))


def test_account_marks_non_poisson_steps():
    privatizer = fdp.chain(
        fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0), fdp.account(0.1, poisson=False)
    )
    state = privatizer.init(None)
    _, state = privatizer.update({"w": torch.ones(2, 3)}, state, key=fdp.random.key(0))
    assert state[-1].ledger.records == (fdp.LedgerRecord(1.0, 0.1, 1, False),)

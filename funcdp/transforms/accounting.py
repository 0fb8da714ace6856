"""Accounting transforms: record each step in the privacy ledger, refuse steps over budget."""

from __future__ import annotations

import math
from typing import NamedTuple

from funcdp._checks import check_delta, check_positive, check_sample_rate
from funcdp.accounting.accountant import Method, epsilon
from funcdp.accounting.ledger import Ledger, Mechanism
from funcdp.mf.accounting import mechanism as strategy_mechanism
from funcdp.transforms.base import AGGREGATE, GradientTransformation, PrivacyContext


class AccountState(NamedTuple):
    """The privacy ledger of the steps this chain has released."""

    ledger: Ledger


class BudgetExceededError(RuntimeError):
    """A step would spend more privacy than the budget allows; nothing was released."""


def account(
    sample_rate: float, *, poisson: bool = True, min_separation: int = 1
) -> GradientTransformation:
    """Records one step of the noise mechanism upstream (sigma, rate q) per update.

    The gradient passes unchanged; the ledger lives in this transform's state, and so in the
    train state (`TrainState.ledger`), where `funcdp.accounting.epsilon` reads it. Pass
    `poisson=False` when the batches come from `shuffled_batches`: the steps are then marked,
    and `epsilon` warns that its figure assumes Poisson sampling.

    Behind `gaussian_noise` each step is a Poisson-subsampled Gaussian. Behind
    `correlated_noise` the ledger records the strategy's mechanism (`funcdp.mf.mechanism`:
    amplified BandMF, or one Gaussian mechanism per run), and a sampler the strategy cannot be
    accounted with is refused here, when the chain is built.

    Args:
      sample_rate: q in (0, 1]: the Poisson rate, or with cyclic Poisson sampling the rate
        within the step's group.
      poisson: False for shuffled fixed-size batches.
      min_separation: b of `cyclic_poisson_batches(min_separation=b)`, whose units join at
        most one step in b; 1 (the default) for `poisson_batches`.

    Raises:
      ValueError: sample_rate outside (0, 1], min_separation < 1, or (when chained) no noise
        upstream, or a sampler the noise's strategy cannot be accounted with.
    """
    check_sample_rate(sample_rate)
    sample_rate = float(sample_rate)
    if (
        not isinstance(min_separation, int)
        or isinstance(min_separation, bool)
        or min_separation < 1
    ):
        raise ValueError(f"min_separation must be an int >= 1, got {min_separation!r}")
    if min_separation > 1 and not poisson:
        raise ValueError(
            "min_separation > 1 describes cyclic Poisson batches: it needs poisson=True"
        )

    def bind(context: PrivacyContext) -> tuple[GradientTransformation, PrivacyContext]:
        noise_multiplier = _noise_multiplier_of(context, "account")
        if context.strategy is None:
            mechanism = Mechanism(min_separation=min_separation)
        else:
            mechanism = strategy_mechanism(
                context.strategy, min_separation=min_separation, poisson=poisson
            )
        recorder = _recorder(noise_multiplier, sample_rate, poisson, mechanism)
        return recorder, context._replace(sample_rate=sample_rate)

    return GradientTransformation(
        lambda params: AccountState(Ledger()), _unbound, AGGREGATE, bind=bind
    )


def budget(max_epsilon: float, *, delta: float, method: Method = "pld") -> GradientTransformation:
    """Refuses a step that would take epsilon above `max_epsilon`, before anything is released.

    Place it after `account(sample_rate)`: it reads the ledger that `account` keeps (no ledger of
    its own), so a budget added to a resumed run sees the epsilon already spent. The chain runs
    the check on its new state and raises `BudgetExceededError`, so the train step returns no
    noisy gradient and the state stays as it was.

    Raises:
      ValueError: max_epsilon is not > 0, delta outside (0, 1), or no `account` upstream.
    """
    check_positive("max_epsilon", max_epsilon)
    check_delta(delta)
    if method not in ("rdp", "pld"):
        raise ValueError(f'method must be "rdp" or "pld", got {method!r}')

    def spent(ledger: Ledger) -> float:
        # Any valid upper bound within the budget lets the step through: RDP's is the cheaper.
        value = epsilon(ledger, delta=delta, method="rdp")
        if method == "pld" and not value <= max_epsilon:
            value = epsilon(ledger, delta=delta, method="pld")
        return value

    # Epsilon grows with every record's steps, so a ledger with no more steps than one found
    # within the budget is within it too: steps are checked against that frontier, and the
    # accountant runs again only past it (it took about 30 ms a step).
    frontier = _Frontier(lambda ledger: spent(ledger) <= max_epsilon)

    def check(state: tuple) -> None:
        (ledger,) = [part.ledger for part in state if isinstance(part, AccountState)]
        if frontier.covers(ledger):
            return
        value = spent(ledger)
        if value > max_epsilon or math.isnan(value):
            raise BudgetExceededError(
                f"this step would spend epsilon={value:.4g} at delta={delta:g}, over the "
                f"budget max_epsilon={max_epsilon:g}; the step was refused"
            )
        frontier.extend(ledger)

    def bind(context: PrivacyContext) -> tuple[GradientTransformation, PrivacyContext]:
        _noise_multiplier_of(context, "budget")
        if context.sample_rate is None:
            raise ValueError("budget needs account(sample_rate) upstream in the chain")
        passthrough = GradientTransformation(lambda params: (), _passthrough, AGGREGATE)
        return passthrough, context._replace(checks=(*context.checks, check))

    return GradientTransformation(lambda params: (), _unbound, AGGREGATE, bind=bind)


class _Frontier:
    """A ledger known to be within a budget, grown along the record that grows."""

    def __init__(self, within) -> None:
        self.within = within  # ledger -> bool, monotone: false once past the budget
        self.ledger: Ledger | None = None
        self.last: Ledger | None = None

    def covers(self, ledger: Ledger) -> bool:
        """Whether `ledger` has the frontier's records with at most as many steps each."""
        if self.ledger is None or len(ledger.records) != len(self.ledger.records):
            return False
        return all(
            r._replace(steps=0) == f._replace(steps=0) and r.steps <= f.steps
            for r, f in zip(ledger.records, self.ledger.records, strict=True)
        )

    def extend(self, ledger: Ledger) -> None:
        """After `ledger` was found within the budget: the frontier is it, with as many more
        steps of its growing record (the one that differs from the last ledger seen, or the
        only one) as stay within, up to as many as it holds (at least 1024): doubling, then
        bisection. Over a run of n steps the accountant runs O(log(n)^2) times."""
        index = self._growing(ledger)
        self.last, self.ledger = ledger, ledger
        if index is None:
            return
        most = max(1024, ledger.records[index].steps)
        good, bad = 0, 1
        while bad <= most and self._fits(ledger, index, bad):
            good, bad = bad, 2 * bad
        while good < most and bad - good > 1:  # bad failed (unless past `most`): bisect
            middle = (good + bad) // 2
            good, bad = (middle, bad) if self._fits(ledger, index, middle) else (good, middle)
        self.ledger = _more_steps(ledger, index, good)

    def _fits(self, ledger: Ledger, index: int, extra: int) -> bool:
        return self.within(_more_steps(ledger, index, extra))

    def _growing(self, ledger: Ledger) -> int | None:
        records = ledger.records
        if self.last is None:
            return 0 if len(records) == 1 else None
        if len(records) != len(self.last.records):  # a new record comes last
            return len(records) - 1 if len(records) == len(self.last.records) + 1 else None
        pairs = zip(records, self.last.records, strict=True)
        changed = [i for i, (record, before) in enumerate(pairs) if record != before]
        return changed[0] if len(changed) == 1 else None


def _more_steps(ledger: Ledger, index: int, extra: int) -> Ledger:
    records = list(ledger.records)
    records[index] = records[index]._replace(steps=records[index].steps + extra)
    return Ledger(tuple(records))


def _passthrough(updates, state, params=None, *, key=None, mask=None):
    del params, key, mask
    return updates, state


def _recorder(
    noise_multiplier: float, sample_rate: float, poisson: bool, mechanism: Mechanism
) -> GradientTransformation:
    def update(updates, state, params=None, *, key=None, mask=None):
        del params, key, mask
        ledger = state.ledger.record(
            noise_multiplier, sample_rate, poisson=poisson, mechanism=mechanism
        )
        return updates, AccountState(ledger)

    return GradientTransformation(lambda params: AccountState(Ledger()), update, AGGREGATE)


def _noise_multiplier_of(context: PrivacyContext, name: str) -> float:
    if context.noise_multiplier is None:
        raise ValueError(
            f"{name} needs gaussian_noise(noise_multiplier) or correlated_noise(...) upstream in "
            "the chain"
        )
    return context.noise_multiplier


def _unbound(updates, state, params=None, *, key=None, mask=None):
    raise ValueError("account and budget read sigma from the chain: use them inside chain(...)")

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

    def check(state: tuple) -> None:
        (ledger,) = [part.ledger for part in state if isinstance(part, AccountState)]
        # Any valid upper bound within the budget lets the step through: RDP's is the cheaper.
        spent = epsilon(ledger, delta=delta, method="rdp")
        if method == "pld" and not spent <= max_epsilon:
            spent = epsilon(ledger, delta=delta, method="pld")
        if spent > max_epsilon or math.isnan(spent):
            raise BudgetExceededError(
                f"this step would spend epsilon={spent:.4g} at delta={delta:g}, over the "
                f"budget max_epsilon={max_epsilon:g}; the step was refused"
            )

    def bind(context: PrivacyContext) -> tuple[GradientTransformation, PrivacyContext]:
        _noise_multiplier_of(context, "budget")
        if context.sample_rate is None:
            raise ValueError("budget needs account(sample_rate) upstream in the chain")
        passthrough = GradientTransformation(lambda params: (), _passthrough, AGGREGATE)
        return passthrough, context._replace(checks=(*context.checks, check))

    return GradientTransformation(lambda params: (), _unbound, AGGREGATE, bind=bind)


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

"""White-box one-run audit of a privatizer chain with Dirac gradient canaries.

The canaries go through the real code: membership is a fair coin per canary (recorded), each
step's batch of included canaries is drawn by `funcdp.data.poisson_batches` at the run's sample
rate, and the batch's per-example gradients go through the privatizer's own `init`/`update`
(clip, aggregate, noise, normalize, account) with keys from `funcdp.random`. The score of canary
i is the sum over steps of the privatized update on its coordinate; the auditor guesses the
highest scores "in" and the lowest "out" and turns its hits into a lower bound on epsilon with
`one_run_epsilon_lower_bound` (Steinke, Nasr & Jagielski 2023).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from funcdp import random as fdr
from funcdp._checks import check_delta, check_sample_rate
from funcdp.accounting.ledger import Ledger
from funcdp.audit.bounds import guess_from_scores
from funcdp.audit.canaries import (
    canary_batches,
    check_canary_norm,
    dirac_canary_grads,
    draw_included,
    flatten,
    num_coordinates,
)
from funcdp.transforms.accounting import AccountState
from funcdp.transforms.base import REDUCE, GradientTransformation


class AuditResult(NamedTuple):
    """The outcome of a one-run audit.

    Attributes:
      epsilon_lower_bound: epsilon the run provably exceeds, at the audit's confidence.
      num_canaries: m, the canaries drawn (about half were included).
      num_guesses: r, how many canaries the auditor guessed (it abstained on the others).
      num_correct: how many of the guesses were right.
      scores: float64 tensor [m], canary i's summed privatized update on its coordinate.
      included: bool tensor [m], whether canary i was in the run (the secret).
    """

    epsilon_lower_bound: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    scores: torch.Tensor
    included: torch.Tensor


class CanaryRun(NamedTuple):
    """What a run of the privatizer over Dirac canaries left: scores, secrets, and its ledger.

    Attributes:
      scores: float64 tensor [m].
      included: bool tensor [m].
      ledger: the ledger of the chain's `account` transform after the run (None without one),
        to read the accountant's epsilon with `funcdp.epsilon`.
    """

    scores: torch.Tensor
    included: torch.Tensor
    ledger: Ledger | None


def run_dirac_canaries(
    privatizer: GradientTransformation,
    params: Any,
    *,
    sample_rate: float,
    steps: int,
    num_canaries: int = 1000,
    key: torch.Tensor,
    canary_norm: float | None = None,
) -> CanaryRun:
    """Runs `steps` steps of `privatizer` on Dirac canaries and scores them.

    Canary i is a gradient of norm `canary_norm` on flattened coordinate i of `params`; the
    privatizer sees only canary gradients, so its coordinates carry nothing else.

    Args:
      privatizer: a chain with an `aggregate()`, e.g. `chain(clip(C), aggregate(),
        gaussian_noise(sigma), normalize(b), account(q))`.
      params: the parameter tree the privatizer works on; it needs at least `num_canaries`
        scalars.
      sample_rate: Poisson sampling rate q of the run, in (0, 1].
      steps: number of steps T >= 1.
      num_canaries: m >= 2.
      key: a `funcdp.random` key; membership, batches and noise are derived from it.
      canary_norm: L2 norm of each canary; default the privatizer's declared sensitivity.

    Raises:
      ValueError: an argument out of range, a privatizer without aggregation or declared
        sensitivity (and no canary_norm), or too few coordinates for the canaries.
    """
    check_sample_rate(sample_rate)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(num_canaries, int) or num_canaries < 2:
        raise ValueError(f"num_canaries must be an int >= 2, got {num_canaries!r}")
    if privatizer.stage != REDUCE:
        raise ValueError(
            f"privatizer must aggregate per-example gradients (stage 'reduce'), got stage "
            f"{privatizer.stage!r}: build it with chain(clip(...), aggregate(), ...)"
        )
    if canary_norm is None:
        if privatizer.sensitivity is None:
            raise ValueError("the privatizer declares no sensitivity: pass canary_norm explicitly")
        canary_norm = privatizer.sensitivity
    canary_norm = check_canary_norm(canary_norm)
    size = num_coordinates(params)
    if size < num_canaries:
        raise ValueError(
            f"num_canaries must be at most the {size} coordinates of params (one coordinate per "
            f"canary), got {num_canaries}"
        )
    include_key, sample_key, noise_key = fdr.split(key, 3)
    included = draw_included(include_key, num_canaries)
    members = included.nonzero().flatten()
    state = privatizer.init(params)
    scores = torch.zeros(num_canaries, dtype=torch.float64)
    batches = canary_batches(len(members), sample_rate, key=sample_key, steps=steps)
    for t, (indices, mask) in enumerate(batches):
        coordinates = members[indices] if len(members) else indices
        grads = dirac_canary_grads(params, coordinates, canary_norm)
        update, state = privatizer.update(
            grads, state, params, key=fdr.fold_in(noise_key, t), mask=mask
        )
        scores += flatten(update)[:num_canaries]
    return CanaryRun(scores, included, _ledger_of(state))


def audit_privatizer(
    privatizer: GradientTransformation,
    params: Any,
    *,
    sample_rate: float,
    steps: int,
    num_canaries: int = 1000,
    key: torch.Tensor,
    canary_norm: float | None = None,
    delta: float,
    confidence: float = 0.95,
) -> AuditResult:
    """White-box one-run audit of `privatizer` with Dirac canaries.

    Runs `run_dirac_canaries`, then guesses with `guess_from_scores` (top k "in", bottom k
    "out", k from a fixed grid with a Bonferroni correction) and returns the lower bound on
    epsilon at `delta`, which holds with probability at least `confidence` over the run.

    The audit is tightest when the adversary sees the most: full-batch runs (sample_rate 1)
    with few steps. Compare the bound with `funcdp.epsilon` of the same chain's ledger (see
    `run_dirac_canaries`) and with `one_run_ceiling`, the most the method can certify with this
    many canaries.

    Args:
      privatizer, params, sample_rate, steps, num_canaries, key, canary_norm: as in
        `run_dirac_canaries`.
      delta: the delta at which to bound epsilon, in (0, 1).
      confidence: in (0, 1).

    Returns:
      An `AuditResult`.
    """
    check_delta(delta)
    run = run_dirac_canaries(
        privatizer,
        params,
        sample_rate=sample_rate,
        steps=steps,
        num_canaries=num_canaries,
        key=key,
        canary_norm=canary_norm,
    )
    outcome = guess_from_scores(
        run.scores.numpy(), run.included.numpy(), delta=delta, confidence=confidence
    )
    return AuditResult(
        outcome.epsilon_lower_bound,
        num_canaries,
        outcome.num_guesses,
        outcome.num_correct,
        run.scores,
        run.included,
    )


def _ledger_of(privacy_state: Any) -> Ledger | None:
    accounts = optree.tree_leaves(
        privacy_state, is_leaf=lambda node: isinstance(node, AccountState)
    )
    accounts = [a for a in accounts if isinstance(a, AccountState)]
    return accounts[0].ledger if len(accounts) == 1 else None

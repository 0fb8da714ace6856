"""Many-run audit: one Dirac canary, many runs with it and many without (Nasr et al. 2023).

Each trial runs the real privatizer chain from its `init`: with the canary in the data set
(Poisson-sampled at the run's rate like any example) or without it, and scores the canary's
coordinate. A threshold test "score > t means in" is chosen on one half of the trials and its
false-positive and false-negative counts on the other half give the bound, so choosing t costs
no confidence.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from funcdp import random as fdr
from funcdp.audit.canaries import canary_batches, check_canary_norm, dirac_canary_grads, flatten
from funcdp.audit.many_run_bounds import (
    many_run_epsilon_lower_bound,
    many_run_gdp_epsilon_lower_bound,
)


class ManyRunResult(NamedTuple):
    """The outcome of `many_run_audit`.

    Attributes:
      epsilon_lower_bound: from Clopper-Pearson error rates (a proof at the confidence).
      gdp_epsilon_lower_bound: through the Gaussian-DP trade-off (assumes a Gaussian mechanism).
      threshold: the threshold chosen on the first half of the trials.
      false_positives, false_negatives, num_trials: the counts on the second half.
    """

    epsilon_lower_bound: float
    gdp_epsilon_lower_bound: float
    threshold: float
    false_positives: int
    false_negatives: int
    num_trials: int


def many_run_scores(
    privatizer: Any,
    params: Any,
    *,
    sample_rate: float,
    steps: int,
    num_trials: int,
    key: torch.Tensor,
    canary_norm: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a Dirac canary on flattened coordinate 0 over runs with and without it.

    Returns:
      `(scores_in, scores_out)`, float64 tensors [num_trials]: the sum over steps of the
      privatized update on coordinate 0, in runs whose data set holds the canary or not.
    """
    if not isinstance(num_trials, int) or num_trials < 2:
        raise ValueError(f"num_trials must be an int >= 2, got {num_trials!r}")
    norm = check_canary_norm(privatizer.sensitivity if canary_norm is None else canary_norm)
    scores = torch.zeros(2, num_trials, dtype=torch.float64)
    for trial in range(num_trials):
        for row, present in enumerate((True, False)):
            trial_key = fdr.fold_in(fdr.fold_in(key, trial), row)
            sample_key, noise_key = fdr.split(trial_key, 2)
            state = privatizer.init(params)
            batches = canary_batches(int(present), sample_rate, key=sample_key, steps=steps)
            for t, (indices, mask) in enumerate(batches):
                grads = dirac_canary_grads(params, torch.zeros_like(indices), norm)
                update, state = privatizer.update(
                    grads, state, params, key=fdr.fold_in(noise_key, t), mask=mask
                )
                scores[row, trial] += flatten(update)[0]
    return scores[0], scores[1]


def many_run_audit(
    scores_in: torch.Tensor | np.ndarray,
    scores_out: torch.Tensor | np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
) -> ManyRunResult:
    """Bounds epsilon from scores of runs with and without the canary, held-out threshold.

    The first half of each set picks the threshold with the highest bound; the second half,
    which the choice never saw, is counted and bounded with `many_run_epsilon_lower_bound`.
    """
    scores_in = np.asarray(scores_in, dtype=np.float64)
    scores_out = np.asarray(scores_out, dtype=np.float64)
    if scores_in.shape != scores_out.shape or scores_in.ndim != 1 or len(scores_in) < 4:
        raise ValueError(
            "scores_in and scores_out must be 1-D with the same length >= 4, got shapes "
            f"{scores_in.shape} and {scores_out.shape}"
        )
    half = len(scores_in) // 2
    pick_in, pick_out = scores_in[:half], scores_out[:half]
    test_in, test_out = scores_in[half:], scores_out[half:]

    def bound(t: float, ins: np.ndarray, outs: np.ndarray) -> tuple[float, int, int]:
        fp, fn = int((outs > t).sum()), int((ins <= t).sum())
        eps = many_run_epsilon_lower_bound(fp, fn, len(ins), delta=delta, confidence=confidence)
        return eps, fp, fn

    candidates = np.quantile(np.concatenate([pick_in, pick_out]), np.linspace(0.0, 1.0, 101))
    threshold = max(candidates, key=lambda t: bound(t, pick_in, pick_out)[0])
    eps, fp, fn = bound(threshold, test_in, test_out)
    gdp = many_run_gdp_epsilon_lower_bound(fp, fn, len(test_in), delta=delta, confidence=confidence)
    return ManyRunResult(eps, gdp, float(threshold), fp, fn, len(test_in))

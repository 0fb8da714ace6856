"""Input-space canaries for black-box audits, scored by the loss of the final model.

A black-box auditor sees only the trained model. Its canaries are examples the model would not
fit unless it trained on them: real inputs with a wrong label (mislabelled) or inputs from no
class at all (out of distribution) with a random label. Each canary joins the training data with
probability 1/2 (`funcdp.audit.canaries.draw_included`); afterwards the auditor scores each
canary by minus its loss under the final model (fitted canaries were likely trained on) and
turns the scores into a bound with `guess_from_scores`. Black-box audits are weaker than
white-box ones: they certify much less than the accountant's epsilon on a correct engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from funcdp import random as fdr


def mislabelled_canaries(
    inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, *, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same inputs, each with a label drawn uniformly among the WRONG classes.

    Args:
      inputs: [m, ...] canary inputs (e.g. held-out examples the run does not otherwise use).
      labels: [m] their true labels in 0..num_classes-1.
      num_classes: K >= 2.
      key: a `funcdp.random` key.

    Returns:
      `(inputs, wrong_labels)`; wrong_labels[i] != labels[i] for every i.
    """
    _check_classes(num_classes)
    if labels.dim() != 1 or len(labels) != len(inputs):
        raise ValueError(
            f"labels must have shape [{len(inputs)}] to match inputs, got {tuple(labels.shape)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    shift = 1 + (fdr.uniform(key, (len(labels),)) * (num_classes - 1)).long()
    return inputs, (labels.long() + shift) % num_classes


def random_input_canaries(
    num_canaries: int,
    shape: tuple[int, ...],
    num_classes: int,
    *,
    key: torch.Tensor,
    low: float = 0.0,
    high: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-distribution canaries: uniform noise inputs in [low, high) with uniform labels.

    Returns:
      `(inputs [m, *shape] float32, labels [m] int64)`.
    """
    _check_classes(num_classes)
    if not isinstance(num_canaries, int) or num_canaries < 1:
        raise ValueError(f"num_canaries must be a positive int, got {num_canaries!r}")
    if not low < high:
        raise ValueError(f"low must be below high, got low={low!r} and high={high!r}")
    input_key, label_key = fdr.split(key, 2)
    noise = fdr.uniform(input_key, (num_canaries, *shape)).float()
    inputs = low + (high - low) * noise
    labels = (
        (fdr.uniform(label_key, (num_canaries,)) * num_classes).long().clamp(max=num_classes - 1)
    )
    return inputs, labels


def loss_scores(
    loss_fn: Callable[..., torch.Tensor],
    params: Any,
    buffers: Any,
    inputs: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Minus the loss of each canary under the trained model: higher means "trained on it".

    Args:
      loss_fn: `loss_fn(params, buffers, x, y)`, the loss of ONE example (as for the train step).
      params, buffers: the trained model's tensors (`TrainState.params`, `.buffers`).
      inputs, labels: the canaries, [m, ...] and [m].

    Returns:
      float64 tensor [m].
    """
    with torch.no_grad():
        losses = torch.func.vmap(loss_fn, in_dims=(None, None, 0, 0))(
            params, buffers, inputs, labels
        )
    return -losses.detach().to(torch.float64).reshape(-1)


def _check_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")

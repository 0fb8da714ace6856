"""Per-example losses of Hugging Face models: ONE example in, one scalar out.

Each loss takes one example's `input_ids` [T], `attention_mask` [T] (1: real token, 0: padding)
and labels, runs the model on it as a batch of one, and returns the loss of that example alone,
so that clipping bounds each example's influence whatever the rest of the batch holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction: the input ids, with `IGNORE_INDEX` on padding."""
    return torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over ONE example's real target tokens.

    Position t predicts labels[t + 1]; targets equal to `IGNORE_INDEX` (-100, as in HF) count
    neither in the sum nor in the count. An example with no real target has loss 0 (and a zero
    gradient), not NaN.

    Args:
      logits: [T, V] or [1, T, V], one example's logits.
      labels: [T] (or [1, T]) token ids, `IGNORE_INDEX` where nothing is predicted.
    """
    logits = logits.reshape(-1, logits.shape[-1])[:-1]
    targets = labels.reshape(-1)[1:]
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def classification_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ONE example's class logits [C] (or [1, C]) against its label."""
    return F.cross_entropy(logits.reshape(1, -1).float(), label.reshape(1))

"""The loss of one privacy unit (a user or a client) from the losses of its rows.

With user-level batches (`funcdp.data.UserLoader`) a unit holds k rows and a mask `rows` of the
real ones; the unit's loss combines its real rows only, so a padded row, or a user whose rows are
all masked out, has exactly zero gradient. The model sees the unit's k rows as one batch
(`apply_fn(params, buffers, x)` with x [k, ...]), which the ghost mode of the train step handles
like a sequence: a loss that vmaps over the rows itself cannot be traced by ghost clipping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

RowLosses = Callable[..., torch.Tensor]
Reduction = Literal["mean", "sum"]


def user_loss(row_losses: RowLosses, *, reduction: Reduction = "mean") -> RowLosses:
    """`loss(params, buffers, *tensors [k, ...], rows [k])`, the loss of ONE unit.

    `row_losses(params, buffers, *tensors)` returns the losses [k] of a unit's k rows, e.g.
    `F.cross_entropy(apply_fn(params, buffers, x), y, reduction="none")`. "mean" divides the
    sum over the real rows by their count (by 1 when there is none), "sum" does not divide.
    Either way the unit's gradient is then clipped as a whole by `make_train_step`, so the
    sensitivity is C per unit whatever k is.

    Raises:
      ValueError: reduction is not "mean" or "sum" (when built); `row_losses` returned a shape
        other than [k] (when called).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f'reduction must be "mean" or "sum", got {reduction!r}')

    def loss(params, buffers, *tensors_and_rows):
        *tensors, rows = tensors_and_rows
        losses = row_losses(params, buffers, *tensors)
        if tuple(losses.shape) != tuple(rows.shape):
            raise ValueError(
                f"row_losses must return one loss per row, shape {tuple(rows.shape)}, got "
                f"{tuple(losses.shape)}: use reduction='none' in the loss"
            )
        total = torch.where(rows, losses, torch.zeros_like(losses)).sum()
        if reduction == "sum":
            return total
        return total / rows.sum().clamp(min=1).to(total.dtype)

    return loss

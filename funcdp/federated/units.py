"""The loss of one privacy unit (a user or a client) from the loss of one example.

With user-level batches (`funcdp.data.UserLoader`) a unit holds up to k rows and a mask `rows`
of the real ones; the unit's loss combines its real rows only, so a padded row, or a user whose
rows are all masked out, has exactly zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

ExampleLoss = Callable[..., torch.Tensor]
Reduction = Literal["mean", "sum"]


def user_loss(example_loss: ExampleLoss, *, reduction: Reduction = "mean") -> ExampleLoss:
    """`loss(params, buffers, *tensors [k, ...], rows [k])` of one unit from a per-example loss.

    `example_loss(params, buffers, *example)` is the loss of ONE example (as for
    `make_train_step`); it is vmapped over the unit's k rows. "mean" divides the sum over the
    real rows by their count (by 1 when there is none), "sum" does not divide. Either way the
    unit's gradient is then clipped as a whole, so its sensitivity is C per unit whatever k is.

    Raises:
      ValueError: reduction is not "mean" or "sum".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f'reduction must be "mean" or "sum", got {reduction!r}')

    def loss(params, buffers, *tensors_and_rows):
        *tensors, rows = tensors_and_rows
        in_dims = (None, None) + (0,) * len(tensors)
        losses = torch.func.vmap(example_loss, in_dims=in_dims)(params, buffers, *tensors)
        total = torch.where(rows, losses, torch.zeros_like(losses)).sum()
        if reduction == "sum":
            return total
        return total / rows.sum().clamp(min=1).to(total.dtype)

    return loss

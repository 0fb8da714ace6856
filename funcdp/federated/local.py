"""Local training on one client: a pure function of the global parameters and the client's data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from funcdp._checks import check_positive
from funcdp.federated.units import Reduction, RowLosses, user_loss
from funcdp.tree import tree_map


def local_sgd(
    row_losses: RowLosses,
    *,
    learning_rate: float,
    local_steps: int,
    buffers: dict[str, torch.Tensor] | None = None,
    reduction: Reduction = "mean",
) -> Callable[[dict[str, torch.Tensor], tuple[torch.Tensor, ...]], Any]:
    """`local_update(params, client_data) -> params` after `local_steps` steps of gradient descent.

    `client_data` is `(*tensors [k, ...], rows [k])`, one client's rows and the mask of the real
    ones (what `funcdp.data.UserLoader` yields per unit). Each step descends the gradient of the
    client's loss over its real rows (`user_loss(row_losses, reduction=...)`), so a client
    without real rows returns the global parameters unchanged: its update is exactly zero. The
    function has no state and draws no randomness, so `make_round` can vmap it over clients.

    Args:
      row_losses: `row_losses(params, buffers, *tensors [k, ...]) -> [k]`, the losses of the
        client's rows (e.g. `F.cross_entropy(..., reduction="none")`).
      learning_rate: the client's step size, a finite number > 0.
      local_steps: number of full-batch steps, an int >= 1.
      buffers: the model's buffers, passed to every call of the loss (default none).
      reduction: "mean" or "sum" over the client's real rows.

    Raises:
      ValueError: learning_rate or local_steps outside its range.
    """
    check_positive("learning_rate", learning_rate)
    if not isinstance(local_steps, int) or isinstance(local_steps, bool) or local_steps < 1:
        raise ValueError(f"local_steps must be an int >= 1, got {local_steps!r}")
    loss = user_loss(row_losses, reduction=reduction)
    buffers = dict(buffers or {})
    lr = float(learning_rate)
    gradient = torch.func.grad(lambda params, data: loss(params, buffers, *data))

    def local_update(params, client_data):
        for _ in range(local_steps):
            grads = gradient(params, tuple(client_data))
            params = tree_map(lambda p, g: p - lr * g, params, grads)
        return params

    return local_update

"""A round split between clients and server, for a sum of clipped updates computed elsewhere.

Under secure aggregation (Flower's SecAgg+) the server never sees one client's update, only the
sum. The round of `make_round` then splits in two: each client clips its own update with the
privatizer's per-unit part (`make_client_update`), the secure aggregator sums them, and the
server adds noise once, normalizes by the expected number of clients, records the round in the
ledger and steps its optimizer (`make_server_update`). Same privatizer, same key: with the same
clients, the result equals `make_round`'s up to the order of the float sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from funcdp.federated.rounds import LocalUpdate, check_state, client_delta_fn, server_step
from funcdp.train import NonFiniteError, TrainState
from funcdp.transforms.base import GradientTransformation, Split, split_at_reduce
from funcdp.tree import tree_leaves, tree_map


def make_client_update(
    local_update: LocalUpdate, privatizer: GradientTransformation
) -> Callable[[dict[str, torch.Tensor], tuple[torch.Tensor, ...]], Any]:
    """`client_update(params, client_data) -> clipped update`, what one client sends to the sum.

    The update is the client's pseudo-gradient (global minus local parameters) passed through
    the privatizer's part up to and including `aggregate()`, so its L2 norm is at most the
    privatizer's sensitivity C.

    Raises:
      ValueError: the privatizer's per-unit part keeps statistics across clients (adaptive
        clipping: its count would need its own secure sum), or it has no `aggregate()`.
    """
    split = _stateless_split(privatizer)
    client_delta = client_delta_fn(local_update)

    def client_update(params, client_data):
        delta = client_delta(params, tuple(client_data))
        if not all(bool(torch.isfinite(leaf).all()) for leaf in tree_leaves(delta)):
            raise NonFiniteError("the client's update is not finite; nothing was sent")
        one = tree_map(lambda leaf: leaf.unsqueeze(0), delta)
        clipped, _ = split.through_sum.update(
            one, split.through_sum.init(params), params, mask=torch.ones(1, dtype=torch.bool)
        )
        return clipped

    return client_update


def make_server_update(
    privatizer: GradientTransformation, server_optimizer: GradientTransformation
) -> Callable[[TrainState, Any], TrainState]:
    """`server_update(state, clipped_sum) -> state`: the server half of a round.

    `clipped_sum` is the sum over the round's sampled clients of their `make_client_update`
    outputs (a tree shaped like the parameters; a zero tree when no client took part: the
    round still adds noise and is accounted). The noise is drawn from `fold_in(state.key,
    state.step)`, as in `make_round`.

    Raises:
      ValueError: as `make_client_update`; at call time, a sum shaped unlike the parameters
        or not finite (the state is unchanged).
    """
    split = _stateless_split(privatizer)

    def server_update(state: TrainState, clipped_sum) -> TrainState:
        check_state(state)
        _check_sum(clipped_sum, state.params)
        pre_state, _ = split.halves(state.privacy_state)
        return server_step(split, server_optimizer, state, clipped_sum, pre_state)

    return server_update


def _stateless_split(privatizer: GradientTransformation) -> Split:
    split = split_at_reduce(privatizer)
    if split.through_sum.finish is not None:
        raise ValueError(
            "a privatizer whose per-client part keeps statistics across clients (adaptive "
            "clipping) cannot be split between clients and a secure sum; use clip(C)"
        )
    return split


def _check_sum(clipped_sum, params) -> None:
    if not isinstance(clipped_sum, dict) or set(clipped_sum) != set(params):
        raise ValueError(
            "clipped_sum must be a dict with the parameters' names, got "
            f"{sorted(clipped_sum) if isinstance(clipped_sum, dict) else type(clipped_sum)}"
        )
    for name, value in clipped_sum.items():
        if not isinstance(value, torch.Tensor) or value.shape != params[name].shape:
            raise ValueError(
                f"clipped_sum[{name!r}] must have shape {tuple(params[name].shape)}, got "
                f"{getattr(value, 'shape', type(value).__name__)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"clipped_sum[{name!r}] is not finite")

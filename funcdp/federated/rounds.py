"""One DP-FedAvg round as a pure function: sampled clients train locally, updates are privatized.

A round is the train step with the unit changed from an example to a client, and the per-unit
gradient replaced by a client's model update after local training (McMahan, Ramage, Talwar &
Zhang 2018, "Learning differentially private recurrent language models"). Each sampled client's
update `local_update(params, client_data) - params` is computed with `torch.func.vmap` over the
clients, in chunks; the privatizer's per-unit part (clipping, adaptive clipping) and
`aggregate()` run on each chunk, and the rest (noise, normalization by the EXPECTED number of
clients, accounting) runs once per round. The server optimizer then steps on the negated mean
update (the "pseudo-gradient"): `funcdp.optim.sgd(1.0)` is FedAvg, `funcdp.optim.adam` FedAdam
(Reddi et al. 2021, "Adaptive federated optimization").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from funcdp import random as fdr
from funcdp.data import Batch
from funcdp.optim import apply_updates
from funcdp.train import NonFiniteError, TrainState, check_batch
from funcdp.train import checked_state as check_state
from funcdp.transforms.base import GradientTransformation, Split, split_at_reduce
from funcdp.tree import per_example_norms, tree_add, tree_map

LocalUpdate = Callable[[dict[str, torch.Tensor], tuple[torch.Tensor, ...]], Any]
Round = Callable[[TrainState, Batch], tuple[TrainState, dict[str, Any]]]


def make_round(
    local_update: LocalUpdate,
    privatizer: GradientTransformation,
    server_optimizer: GradientTransformation,
    *,
    chunk_size: int | None = None,
) -> Round:
    """Builds the pure DP federated round `round(state, clients) -> (state, metrics)`.

    Args:
      local_update: `local_update(params, client_data) -> new params`, a pure function of the
        global parameters and ONE client's data (a tuple of tensors without the client axis),
        e.g. several local SGD steps (`funcdp.federated.local_sgd`). It is vmapped over the
        clients, so it must not branch on tensor values.
      privatizer: a chain over client updates, e.g. `chain(clip(C), aggregate(),
        gaussian_noise(sigma), normalize(expected_clients), account(client_sample_rate))`;
        `adaptive_clip` in place of `clip` tracks a quantile of the update norms (Andrew et
        al. 2021). The sensitivity is C per client; the ledger counts rounds.
      server_optimizer: a `funcdp.optim` transform applied to the pseudo-gradient (minus the
        privatized mean update).
      chunk_size: clients per vmap call (None: all sampled clients at once); it changes memory
        and speed, never the result beyond float rounding.

    Returns:
      `round(state, clients)`: `state` a `TrainState` (from `TrainState.create(params,
      privatizer=..., optimizer=server_optimizer, key=...)`, `state.step` counts rounds);
      `clients` a `Batch` whose inputs have the client axis first and whose mask marks the
      sampled clients (e.g. from `funcdp.data.UserLoader`). Its metrics (clients, update_norm,
      clipped_fraction) are computed WITHOUT noise: for monitoring, not for release.

    Raises:
      ValueError: chunk_size not an int >= 1, or a privatizer without `aggregate()`; at call
        time, a bad batch or state.
      funcdp.train.NonFiniteError: at call time, a sampled client's update is not finite
        (nothing is released; the input state is never modified).
    """
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    split = split_at_reduce(privatizer)
    clip_norm = split.context.sensitivity

    deltas_of = torch.func.vmap(client_delta_fn(local_update), in_dims=(None, 0))

    def round_fn(state: TrainState, clients: Batch) -> tuple[TrainState, dict[str, Any]]:
        check_state(state)
        inputs, mask = check_batch(clients)
        round_key = fdr.fold_in(state.key, state.step)
        pre_state, _ = split.halves(state.privacy_state)
        size = mask.shape[0]
        chunk = chunk_size or size
        total, norms = None, []
        for index, start in enumerate(range(0, size, chunk)):
            part = tuple(x[start : start + chunk] for x in inputs)
            deltas = deltas_of(state.params, part)
            norm = per_example_norms(deltas)
            bad = ~torch.isfinite(norm) & mask[start : start + chunk].to(norm.device)
            if bool(bad.any()):
                raise NonFiniteError(
                    f"round {state.step}: {int(bad.sum())} sampled client(s) returned a "
                    "non-finite update; the state is unchanged"
                )
            summed, pre_state = split.through_sum.update(
                deltas,
                pre_state,
                state.params,
                key=fdr.fold_in(round_key, index),
                mask=mask[start : start + chunk],
            )
            total = summed if total is None else tree_add(total, summed)
            norms.append(norm)
        if split.through_sum.finish is not None:
            pre_state = split.through_sum.finish(pre_state, key=round_key)
        new_state = server_step(split, server_optimizer, state, total, pre_state)
        return new_state, _metrics(torch.cat(norms), mask, clip_norm)

    return round_fn


def client_delta_fn(local_update: LocalUpdate):
    """`delta(params, client_data)`: global minus local parameters, the client's pseudo-gradient
    (a server optimizer descending it moves towards the clients' models)."""

    def client_delta(params, client_data):
        new_params = local_update(params, client_data)
        return tree_map(lambda old, new: old - new, params, new_params)

    return client_delta


def server_step(split: Split, server_optimizer, state: TrainState, total, pre_state) -> TrainState:
    """The round's server half: the privatizer after `aggregate()` (noise, normalization,
    accounting) on the sum of clipped updates, with the key `fold_in(state.key, state.step)`,
    then the server optimizer; the state of the per-unit half is replaced by `pre_state`."""
    _, post_state = split.halves(state.privacy_state)
    round_key = fdr.fold_in(state.key, state.step)
    private, post_state = split.after_sum.update(total, post_state, state.params, key=round_key)
    updates, opt_state = server_optimizer.update(private, state.opt_state, state.params)
    return state._replace(
        params=apply_updates(state.params, updates),
        opt_state=opt_state,
        privacy_state=(*pre_state, *post_state),
        step=state.step + 1,
    )


def _metrics(norms: torch.Tensor, mask: torch.Tensor, clip_norm: float | None) -> dict[str, Any]:
    real = mask.to(norms.device)
    count = int(real.sum())
    mean_norm = float(torch.where(real, norms, 0.0).sum()) / max(count, 1)
    clipped = float("nan")
    if clip_norm is not None:
        clipped = float((real & (norms > clip_norm)).sum()) / max(count, 1)
    return {"clients": count, "update_norm": mean_norm, "clipped_fraction": clipped}

"""A DP federated run on one machine: clients hold label shards of a data split, rounds vmap them.

Kept apart from the command line so that the notebook and the benchmark run the same training
as `funcdp fedavg`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from funcdp import random as fdr
from funcdp.accounting import epsilon
from funcdp.data import Batch, UserLoader
from funcdp.datasets import Split
from funcdp.federated.algorithms import DPFederated, dp_fedadam, dp_fedavg
from funcdp.federated.local import local_sgd
from funcdp.federated.rounds import make_round
from funcdp.federated.shards import label_shards
from funcdp.functional import functionalize
from funcdp.train import TrainState, make_eval_step


class FedRecipe(NamedTuple):
    """The hyperparameters of `funcdp fedavg`; the defaults are the command's.

    Attributes:
      num_clients: clients the training split is dealt to (label shards, non-iid).
      shards_per_client: label shards per client.
      rounds: federated rounds.
      client_rate: q, the probability that a client joins a round.
      noise_multiplier: sigma of the noise on the sum of clipped updates.
      clip: C, the bound on one client's update.
      local_steps, local_lr: full-batch gradient steps a client takes, and their size.
      max_examples: k, rows of a client used in a round (a random subset when it has more).
      server: "fedavg" (server SGD) or "fedadam" (server Adam).
      server_lr: the server optimizer's learning rate.
      target_quantile: None for a fixed clip; else adaptive clipping of the updates.
      hidden: width of the model's hidden layer; 0 for a linear model.
      delta: the delta at which epsilon is reported.
      accountant: "rdp" or "pld" (PLD is tighter and takes about a second per report).
      chunk_size: clients per vmap call (None: all sampled clients at once).
    """

    num_clients: int = 200
    shards_per_client: int = 2
    rounds: int = 30
    client_rate: float = 0.1
    noise_multiplier: float = 1.0
    clip: float = 0.5
    local_steps: int = 5
    local_lr: float = 0.5
    max_examples: int = 32
    server: str = "fedavg"
    server_lr: float = 1.0
    target_quantile: float | None = None
    hidden: int = 0
    delta: float = 1e-5
    accountant: str = "rdp"
    chunk_size: int | None = None


class RoundReport(NamedTuple):
    """One round's figures: test accuracy of the global model and the epsilon spent so far."""

    round: int
    clients: int
    test_accuracy: float
    epsilon: float


def algorithm(recipe: FedRecipe) -> DPFederated:
    """The privatizer and server optimizer of `recipe`."""
    if recipe.server not in ("fedavg", "fedadam"):
        raise ValueError(f'server must be "fedavg" or "fedadam", got {recipe.server!r}')
    build = dp_fedavg if recipe.server == "fedavg" else dp_fedadam
    return build(
        clip_norm=recipe.clip,
        noise_multiplier=recipe.noise_multiplier,
        sample_rate=recipe.client_rate,
        num_clients=recipe.num_clients,
        server_learning_rate=recipe.server_lr,
        target_quantile=recipe.target_quantile,
    )


def fit_federated(
    data: Split,
    recipe: FedRecipe | None = None,
    *,
    seed: int = 0,
    report_every: int = 1,
    on_round: Callable[[RoundReport], None] | None = None,
) -> tuple[TrainState, list[RoundReport]]:
    """Trains with DP-FedAvg/DP-FedAdam on `data` split into non-iid clients; returns the final
    state and a `RoundReport` every `report_every` rounds and after the last (each report asks
    the accountant, which costs more than a round). Every random choice comes from `key(seed)`.

    Raises:
      ValueError: a recipe value or report_every outside its range, named in the message.
    """
    recipe = FedRecipe() if recipe is None else recipe
    if not isinstance(report_every, int) or isinstance(report_every, bool) or report_every < 1:
        raise ValueError(f"report_every must be an int >= 1, got {report_every!r}")
    if recipe.accountant not in ("rdp", "pld"):
        raise ValueError(f'accountant must be "rdp" or "pld", got {recipe.accountant!r}')
    key = fdr.key(seed)
    shard_key, model_key, sample_key, run_key = fdr.split(key, 4)
    clients = label_shards(
        data.y_train,
        num_clients=recipe.num_clients,
        shards_per_client=recipe.shards_per_client,
        key=shard_key,
    )
    with torch.random.fork_rng(devices=[]):  # the initial weights, from the key; the caller's
        torch.manual_seed(fdr.seed(model_key))  # generator is left as it was
        apply_fn, params, buffers = functionalize(_model(data, recipe.hidden))

    def row_losses(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x), y, reduction="none")

    def metrics(params, buffers, x, y):
        logits = apply_fn(params, buffers, x[None])
        return {"accuracy": (logits.argmax(-1) == y).float().squeeze(0)}

    fed = algorithm(recipe)
    local = local_sgd(
        row_losses, learning_rate=recipe.local_lr, local_steps=recipe.local_steps, buffers=buffers
    )
    round_fn = make_round(local, *fed, chunk_size=recipe.chunk_size)
    state = TrainState.create(
        params,
        buffers=buffers,
        privatizer=fed.privatizer,
        optimizer=fed.server_optimizer,
        key=run_key,
    )
    loader = UserLoader(
        (data.x_train, data.y_train),
        clients,
        recipe.client_rate,
        key=sample_key,
        max_examples_per_user=recipe.max_examples,
        steps=recipe.rounds,
    )
    evaluate = make_eval_step(metrics)
    test = Batch((data.x_test, data.y_test), torch.ones(len(data.y_test), dtype=torch.bool))
    reports = []
    for batch in loader:
        state, info = round_fn(state, batch)
        if state.step % report_every and state.step != recipe.rounds:
            continue
        report = RoundReport(
            state.step,
            info["clients"],
            evaluate(state, test)["accuracy"],
            epsilon(state.ledger, delta=recipe.delta, method=recipe.accountant),
        )
        reports.append(report)
        if on_round is not None:
            on_round(report)
    return state, reports


def _model(data: Split, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(data.num_features, data.num_classes)
    return nn.Sequential(
        nn.Linear(data.num_features, hidden), nn.Tanh(), nn.Linear(hidden, data.num_classes)
    )

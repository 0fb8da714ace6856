"""The recipe `funcdp train` runs: a small classifier trained with DP-SGD on a data split.

Kept apart from the command line so that notebooks, benchmarks and the audit can run the same
training as the command.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import funcdp as fdp
from funcdp import datasets
from funcdp.accounting.ledger import DPSGD, Mechanism
from funcdp.data import default_steps


class Recipe(NamedTuple):
    """The hyperparameters of `funcdp train`; the defaults are the command's defaults.

    Attributes:
      epsilon, delta: the privacy target; sigma is calibrated so the whole run spends at most it.
      epochs: passes over the data; one epoch is round(1 / q) Poisson steps.
      batch_size: the EXPECTED batch size (an int on the command line); the sample rate is
        q = batch_size / n_train.
      clip: the per-example L2 clipping norm C.
      lr: the SGD learning rate.
      hidden: width of the hidden layer of the model; 0 for a linear model.
      accountant: "pld" (the default, tighter) or "rdp".
    """

    epsilon: float = 3.0
    delta: float = 1e-5
    epochs: int = 30
    batch_size: float = 256
    clip: float = 1.0
    lr: float = 2.0
    hidden: int = 0
    accountant: str = "pld"


class TrainResult(NamedTuple):
    """What `fit` returns: the trained module, the final state, and the figures it reports."""

    model: nn.Module
    state: fdp.TrainState
    noise_multiplier: float
    test_loss: float
    test_accuracy: float
    epsilon: float


def check_batch_size(recipe: Recipe, n_train: int) -> None:
    """Raises unless the expected batch size fits the training set."""
    if recipe.batch_size > n_train:
        raise ValueError(
            f"must be at most the number of training examples ({n_train}), got {recipe.batch_size}"
        )


def build_model(num_features: int, num_classes: int, hidden: int = Recipe().hidden) -> nn.Module:
    """The model `funcdp train` trains: linear if `hidden` is 0, else Linear-Tanh-Linear."""
    if hidden == 0:
        return nn.Linear(num_features, num_classes)
    return nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))


def fit(
    data: datasets.Split,
    recipe: Recipe | None = None,
    *,
    seed: int = 0,
    on_epoch: Callable[[int, TrainResult], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    process_group: Any = None,
) -> TrainResult:
    """Trains `build_model` on `data.x_train` with DP-SGD by `recipe`; scores it on `data.x_test`.

    The privatizer is `chain(clip, aggregate, gaussian_noise(sigma), normalize, account)` with
    sigma from `calibrate_noise` for epochs * round(1 / q) steps; the reported epsilon is read
    from the state's ledger. `on_epoch(epoch, result)` sees the result after each epoch (without
    it, only the last epoch is scored); `on_step(step, total_steps)` after each step.

    With a `process_group` (e.g. under torchrun), each rank trains on its shard of every
    logical Poisson batch and all ranks end with the same model.

    Raises:
      ValueError: batch_size larger than the number of training examples.
    """
    recipe = Recipe() if recipe is None else recipe
    n_train = len(data.y_train)
    check_batch_size(recipe, n_train)
    rank, world_size = shard_of(process_group)
    q = recipe.batch_size / n_train
    steps_per_epoch = default_steps(q)
    steps = recipe.epochs * steps_per_epoch
    sigma = calibrated_sigma(recipe, sample_rate=q, steps=steps)
    model, params, buffers, loss_fn, metric_fn = seeded_classifier(data, recipe, seed)
    privatizer = fdp.chain(
        fdp.clip(max_norm=recipe.clip),
        fdp.aggregate(),
        fdp.gaussian_noise(noise_multiplier=sigma),
        fdp.normalize(expected_batch_size=recipe.batch_size),
        fdp.account(sample_rate=q),
    )
    root = fdp.random.key(seed)
    loader = fdp.PoissonLoader(
        (data.x_train, data.y_train),
        q,
        key=fdp.random.fold_in(root, 1),
        steps=steps_per_epoch,
        rank=rank,
        world_size=world_size,
    )
    batches = itertools.chain.from_iterable(loader for _ in range(recipe.epochs))
    optimizer = fdp.optim.sgd(learning_rate=recipe.lr)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, process_group=process_group)
    run = Run(model, step, fdp.make_eval_step(metric_fn), sigma, steps_per_epoch)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=run_key(root)
    )
    return run.train(state, batches, data, recipe, on_epoch=on_epoch, on_step=on_step)


def calibrated_sigma(
    recipe: Recipe, *, sample_rate: float, steps: int, mechanism: Mechanism = DPSGD
) -> float:
    """The noise multiplier that spends the recipe's epsilon at its delta (its accountant) over
    `steps` steps of `mechanism` at `sample_rate`."""
    return fdp.calibrate_noise(
        target_epsilon=recipe.epsilon,
        delta=recipe.delta,
        sample_rate=sample_rate,
        steps=steps,
        method=recipe.accountant,
        mechanism=mechanism,
    )


def shard_of(process_group: Any) -> tuple[int, int]:
    """(rank, world size) in `process_group`; (0, 1) without one."""
    if process_group is None:
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def seeded_classifier(data: datasets.Split, recipe: Recipe, seed: int):
    """`build_model` initialized from `seed` (torch's global RNG left as it was), its parameters
    and buffers, and the loss of one example and its metrics:
    (model, params, buffers, loss_fn, metric_fn)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(data.num_features, data.num_classes, recipe.hidden)
    apply_fn, params, buffers = fdp.functionalize(model)
    return (model, params, buffers, *classifier_loss_and_metrics(apply_fn))


def run_key(root: torch.Tensor) -> torch.Tensor:
    """The train state's key of a run seeded by `root` (the sampler takes `fold_in(root, 1)`)."""
    return fdp.random.fold_in(root, 0)


class Run(NamedTuple):
    """One training run of the recipe: its model, step functions, sigma and epoch length."""

    model: nn.Module
    step: Callable
    eval_step: Callable
    noise_multiplier: float
    steps_per_epoch: int

    def train(self, state, batches, data, recipe, *, on_epoch=None, on_step=None) -> TrainResult:
        """Steps through `batches`, scoring on the test split after each epoch that `on_epoch`
        sees (without it, only the last); the epsilon is read from the state's ledger."""
        test = fdp.Batch((data.x_test, data.y_test), torch.ones(len(data.y_test), dtype=torch.bool))
        total, result = recipe.epochs * self.steps_per_epoch, None
        for batch in batches:
            state, _ = self.step(state, batch)  # the metrics come from private data: not released
            if on_step is not None:
                on_step(state.step, total)
            epoch, position = divmod(state.step, self.steps_per_epoch)
            if position or (on_epoch is None and epoch < recipe.epochs):
                continue  # mid-epoch, or nobody reads this epoch's scores
            scores = self.eval_step(state, test)
            spent = fdp.epsilon(state.ledger, delta=recipe.delta, method=recipe.accountant)
            trained = fdp.to_module(self.model, state)
            sigma = self.noise_multiplier
            result = TrainResult(trained, state, sigma, scores["loss"], scores["accuracy"], spent)
            if on_epoch is not None:
                on_epoch(epoch, result)
        return result


def classifier_loss_and_metrics(apply_fn: Callable[..., torch.Tensor]) -> tuple[Callable, Callable]:
    """The cross-entropy of one example, and its loss and accuracy, for a classifier."""

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    def metric_fn(params, buffers, x, y):
        logits = apply_fn(params, buffers, x[None])[0]
        return {"loss": F.cross_entropy(logits, y), "accuracy": (logits.argmax() == y).float()}

    return loss_fn, metric_fn

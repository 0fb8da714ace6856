"""`funcdp train --mechanism bandmf|blt|tree`: the recipe's training with correlated noise.

The same model, loss, clip, optimizer, steps and expected batch size as `funcdp.recipe.fit`
(DP-SGD); only the noise, the sampler and the accounting change. Not imported by
`funcdp.mf` (it needs the train step); the command line imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import funcdp as fdp
from funcdp import datasets
from funcdp._batches import LOADER_SDS
from funcdp._cyclic_sampling import default_cyclic_bucket_size
from funcdp.data import cyclic_poisson_batches, default_steps
from funcdp.mf.accounting import mechanism as strategy_mechanism
from funcdp.mf.builders import banded, blt, tree
from funcdp.mf.choose import choose_strategy
from funcdp.mf.strategies import Strategy
from funcdp.recipe import (
    Recipe,
    Run,
    TrainResult,
    calibrated_sigma,
    check_batch_size,
    run_key,
    seeded_classifier,
    shard_of,
)
from funcdp.transforms.correlated_noise import correlated_noise

MECHANISMS = ("bandmf", "blt", "tree")


def build_strategy(mechanism: str, *, steps: int, steps_per_epoch: int, size: int) -> Strategy:
    """BandMF with `size` bands (amplified: min_separation = bands), or a BLT with `size`
    buffers or the tree, normalized for one participation per epoch.

    Raises:
      ValueError: an unknown mechanism, or bands beyond one epoch's steps.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int or 'auto' (bandmf only), got {size!r}")
    if mechanism == "bandmf":
        if size > steps_per_epoch:
            raise ValueError(
                f"bands must be at most the steps of one epoch ({steps_per_epoch}), got {size}"
            )
        return banded(steps, size)
    if mechanism == "blt":
        return blt(steps, size, min_separation=steps_per_epoch)
    if mechanism == "tree":
        return tree(steps, min_separation=steps_per_epoch)
    raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")


def fit_correlated(
    data: datasets.Split,
    recipe: Recipe,
    *,
    mechanism: str,
    size: int | str = "auto",
    seed: int = 0,
    on_epoch: Callable[[int, TrainResult], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    process_group: Any = None,
) -> TrainResult:
    """Trains like `funcdp.recipe.fit`, with `correlated_noise` and cyclic Poisson batches.

    The examples are split into b groups (b = bands for BandMF, the steps of one epoch for BLT
    and the tree); group t mod b is sampled at step t with rate min(1, batch_size * b / n), so
    the expected batch size is the recipe's. Sigma is calibrated for the strategy's mechanism
    (`funcdp.mf.mechanism`), and the epsilon is read from the ledger. `size="auto"` (BandMF
    only) takes the bands that `funcdp.mf.choose_strategy` predicts best for the run's epsilon,
    delta, sample rate and steps; one band (DP-SGD) is among the candidates.

    Under a process group (torchrun) every rank draws the same logical batch and trains on its
    shard (`cyclic_poisson_batches(rank=, world_size=)`); the noise, drawn from the replicated
    key, is the same on every rank.

    Raises:
      ValueError: a bad mechanism or size, or a batch larger than the training set.
    """
    rank, world_size = shard_of(process_group)
    n_train = len(data.y_train)
    check_batch_size(recipe, n_train)
    steps_per_epoch = default_steps(recipe.batch_size / n_train)
    steps = recipe.epochs * steps_per_epoch
    strategy, q, sigma = _strategy_and_noise(
        recipe, mechanism, size, steps=steps, steps_per_epoch=steps_per_epoch, n_train=n_train
    )
    groups = strategy.min_separation
    model, params, buffers, loss_fn, metric_fn = seeded_classifier(data, recipe, seed)
    privatizer = fdp.chain(
        fdp.clip(max_norm=recipe.clip),
        fdp.aggregate(),
        correlated_noise(sigma, strategy),
        fdp.normalize(expected_batch_size=q * n_train / groups),
        fdp.account(q, min_separation=groups),
    )
    optimizer = fdp.optim.sgd(learning_rate=recipe.lr)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, process_group=process_group)
    run = Run(model, step, fdp.make_eval_step(metric_fn), sigma, steps_per_epoch)
    root = fdp.random.key(seed)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=run_key(root)
    )
    bucket = default_cyclic_bucket_size(n_train, q, groups, world_size, sds=LOADER_SDS)
    indices = cyclic_poisson_batches(
        n_train,
        q,
        key=fdp.random.fold_in(root, 1),
        min_separation=groups,
        steps=steps,
        bucket_size=bucket,
        rank=rank,
        world_size=world_size,
    )
    shard = None if process_group is None else (rank, world_size)
    batches = (
        fdp.Batch((data.x_train[i.indices], data.y_train[i.indices]), i.mask, shard, bucket)
        for i in indices
    )
    return run.train(state, batches, data, recipe, on_epoch=on_epoch, on_step=on_step)


def _strategy_and_noise(
    recipe: Recipe,
    mechanism: str,
    size: int | str,
    *,
    steps: int,
    steps_per_epoch: int,
    n_train: int,
) -> tuple[Strategy, float, float]:
    """(strategy, its groups' sample rate, calibrated sigma) for the run."""
    sample_rate = recipe.batch_size / n_train
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if size == "auto":
        if mechanism != "bandmf":
            raise ValueError(
                f"size='auto' chooses BandMF's bands; give mechanism={mechanism!r} an int size"
            )
        choice = choose_strategy(
            epsilon=recipe.epsilon,
            delta=recipe.delta,
            sample_rate=sample_rate,
            steps=steps,
            method=recipe.accountant,
        )
        return choice.strategy, choice.sample_rate, choice.noise_multiplier
    strategy = build_strategy(mechanism, steps=steps, steps_per_epoch=steps_per_epoch, size=size)
    q = min(1.0, recipe.batch_size * strategy.min_separation / n_train)
    accounted = strategy_mechanism(strategy, min_separation=strategy.min_separation)
    sigma = calibrated_sigma(recipe, sample_rate=q, steps=steps, mechanism=accounted)
    return strategy, q, sigma

"""Noise correlated across steps by a matrix-factorization strategy (BandMF, BLT, tree)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from funcdp._checks import check_noise_multiplier
from funcdp.mf.strategies import Strategy
from funcdp.transforms.base import AGGREGATE, GradientTransformation, PrivacyContext
from funcdp.transforms.noise import keyed_normal
from funcdp.tree import tree_flatten, tree_map, tree_unflatten


class CorrelatedNoiseState(NamedTuple):
    """The number of steps noised so far and the strategy's streaming buffers.

    `buffers` has the structure of the gradient, each leaf [m, *shape] (m: bands - 1, the BLT's
    buffers, or the tree's levels). It holds past noise: a checkpoint that holds it must be kept
    as secret as the noise itself.
    """

    index: int
    buffers: Any


def correlated_noise(noise_multiplier: float, strategy: Strategy) -> GradientTransformation:
    """Adds sigma * C * (M z)_t to the aggregated gradient of step t, M = strategy.noise_matrix.

    C is the sensitivity of the clip upstream (times the scale of any `normalize` between
    aggregation and noise), sigma the noise multiplier, and z_t a standard normal draw from the
    step's key (the same on every rank). M = s C_strategy^-1 is normalized so that the
    strategy's sensitivity under its participation pattern is 1, so the noise of steps s and t
    covaries as (sigma C)^2 (M M^T)[s, t]: the prefix sums an SGD run releases are those of the
    matrix mechanism (Denisov et al. 2022; Choquette-Choo et al. 2023). The noise is generated
    from a small state (`CorrelatedNoiseState`) in the chain's state, so a checkpoint resumes
    bit-identically; no n x n matrix is formed.

    `account(sample_rate, min_separation=b)` downstream records the mechanism (see
    `funcdp.mf.mechanism`): amplified BandMF or one Gaussian mechanism per run.

    Args:
      noise_multiplier: sigma >= 0, relative to the sensitivity of the whole participation
        pattern the strategy is normalized for.
      strategy: a strategy from `funcdp.mf` (`banded`, `blt`, `tree`).

    Raises:
      ValueError: noise_multiplier < 0 or no strategy (when built); no clipping transform
        upstream, or a privatized count beside it (when chained); a step past the strategy's
        `steps` (when run).
    """
    check_noise_multiplier(noise_multiplier)
    if not isinstance(strategy, Strategy):
        raise TypeError(
            f"strategy must be a funcdp.mf strategy (banded, blt, tree), got "
            f"{type(strategy).__name__}"
        )
    noise_multiplier = float(noise_multiplier)

    def bind(context: PrivacyContext) -> tuple[GradientTransformation, PrivacyContext]:
        if context.sensitivity is None:
            raise ValueError(
                "correlated_noise needs a transform with bounded sensitivity upstream: put a "
                "clipping transform such as clip(max_norm) and aggregate() before it"
            )
        if context.count_noise_multiplier is not None:
            raise ValueError(
                "correlated_noise does not support a privatized count upstream (adaptive "
                "clipping): its release is not part of the strategy's accounting; use clip()"
            )
        std = noise_multiplier * context.sensitivity * context.scale * strategy.noise_scale
        bound = GradientTransformation(
            lambda params: _init(strategy, params), _update(strategy, std), AGGREGATE
        )
        return bound, context._replace(noise_multiplier=noise_multiplier, strategy=strategy)

    return GradientTransformation(
        lambda params: _init(strategy, params), _unbound_update, AGGREGATE, bind=bind
    )


def _init(strategy: Strategy, params) -> CorrelatedNoiseState:
    buffers = tree_map(lambda p: strategy.stream_init(p.detach()), params)
    return CorrelatedNoiseState(0, buffers)


def _update(strategy: Strategy, std: float):
    def update(updates, state, params=None, *, key=None, mask=None):
        del params, mask
        if key is None:
            raise ValueError(
                "correlated_noise needs a key: call update(..., key=funcdp.random.key(seed))"
            )
        index = state.index
        if index >= strategy.steps:
            raise ValueError(
                f"correlated_noise's strategy was built for {strategy.steps} steps; step "
                f"{index + 1} is refused (its noise would not be accounted for): build the "
                "strategy for as many steps as the run takes"
            )
        leaves, spec = tree_flatten(updates)
        buffers, buffer_spec = tree_flatten(state.buffers)
        if len(buffers) != len(leaves):
            raise ValueError(
                f"correlated_noise's state holds {len(buffers)} buffers for a gradient of "
                f"{len(leaves)} tensors: initialize it with the parameters being trained"
            )
        noisy, new_buffers = [], []
        for leaf, buffer, z in zip(leaves, buffers, keyed_normal(leaves, 1.0, key), strict=True):
            y, buffer = strategy.stream_step(buffer, z, index)
            noisy.append(torch.add(leaf, y, alpha=std))
            new_buffers.append(buffer)
        new_state = CorrelatedNoiseState(index + 1, tree_unflatten(buffer_spec, new_buffers))
        return tree_unflatten(spec, noisy), new_state

    return update


def _unbound_update(updates, state, params=None, *, key=None, mask=None):
    raise ValueError(
        "correlated_noise takes its scale from the clipping transform upstream: use it inside "
        "chain(clip(...), aggregate(), correlated_noise(...), ...)"
    )

"""Functional optimizers as transforms on the aggregated gradient, and a `torch.optim` adapter.

An optimizer maps the privatized gradient to the update to ADD to the parameters
(`apply_updates`), as in optax. Learning rates are numbers or schedules `fn(step) -> float`.
Optimizers only post-process the privatized gradient, so they cost no privacy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcdp.transforms.base import AGGREGATE, GradientTransformation
from funcdp.tree import tree_clone, tree_map, tree_zeros_like

Schedule = Callable[[int], float]
LearningRate = float | Schedule


class SgdState(NamedTuple):
    """Step count and (for momentum) the velocity tree."""

    count: int
    velocity: Any


class AdamState(NamedTuple):
    """Step count and the first and second moment estimates."""

    count: int
    mu: Any
    nu: Any


class TorchOptimizerState(NamedTuple):
    """The `state_dict()` of the wrapped `torch.optim` optimizer."""

    state_dict: dict


def sgd(
    learning_rate: LearningRate, momentum: float = 0.0, nesterov: bool = False
) -> GradientTransformation:
    """Stochastic gradient descent, with optional (Nesterov) heavy-ball momentum."""
    _check_learning_rate(learning_rate)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")

    def init(params):
        return SgdState(0, tree_zeros_like(params) if momentum else ())

    def update(grads, state, params=None, *, key=None, mask=None):
        del params, key, mask
        lr = _rate(learning_rate, state.count)
        if not momentum:
            return tree_map(lambda g: -lr * g, grads), SgdState(state.count + 1, ())
        velocity = tree_map(lambda v, g: momentum * v + g, state.velocity, grads)
        direction = (
            tree_map(lambda v, g: momentum * v + g, velocity, grads) if nesterov else velocity
        )
        return tree_map(lambda d: -lr * d, direction), SgdState(state.count + 1, velocity)

    return GradientTransformation(init, update, AGGREGATE)


def momentum(
    learning_rate: LearningRate, beta: float = 0.9, nesterov: bool = False
) -> GradientTransformation:
    """SGD with heavy-ball momentum `beta`."""
    return sgd(learning_rate, momentum=beta, nesterov=nesterov)


def adam(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> GradientTransformation:
    """Adam (Kingma & Ba 2015) with bias correction."""
    return adamw(learning_rate, b1, b2, eps, weight_decay=0.0)


def adamw(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> GradientTransformation:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019); needs `params` in update."""
    _check_learning_rate(learning_rate)
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")

    def init(params):
        return AdamState(0, tree_zeros_like(params), tree_zeros_like(params))

    def update(grads, state, params=None, *, key=None, mask=None):
        del key, mask
        if weight_decay and params is None:
            raise ValueError("adamw with weight_decay needs params: update(grads, state, params)")
        count = state.count + 1
        lr = _rate(learning_rate, state.count)
        mu = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        c1, c2 = 1 - b1**count, 1 - b2**count

        def step(m, v, p):
            direction = (m / c1) / ((v / c2).sqrt() + eps)
            if weight_decay:
                direction = direction + weight_decay * p
            return -lr * direction

        updates = tree_map(step, mu, nu, params if weight_decay else mu)
        return updates, AdamState(count, mu, nu)

    return GradientTransformation(init, update, AGGREGATE)


def apply_updates(params: Any, updates: Any) -> Any:
    """New parameters `params + updates`, leaf by leaf, in each parameter's dtype."""
    return tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def from_torch(
    optimizer_class: type[torch.optim.Optimizer], **hyperparameters: Any
) -> GradientTransformation:
    """Any `torch.optim` optimizer as a pure transform: `from_torch(torch.optim.Adam, lr=1e-3)`.

    Each update builds the optimizer over copies of the parameters, loads its state from the
    transform state, hands it the privatized gradient as `.grad`, steps, and returns the change
    of the parameters and the new `state_dict()`. Nothing outside the returned values changes.
    """

    def build(params):
        names = sorted(params)
        copies = {n: params[n].detach().clone().requires_grad_(True) for n in names}
        return copies, optimizer_class([copies[n] for n in names], **hyperparameters)

    def init(params):
        _, optimizer = build(params)
        return TorchOptimizerState(tree_clone(optimizer.state_dict()))

    def update(grads, state, params=None, *, key=None, mask=None):
        del key, mask
        if params is None:
            raise ValueError("from_torch needs params: update(grads, state, params)")
        copies, optimizer = build(params)
        optimizer.load_state_dict(tree_clone(state.state_dict))
        for name, tensor in copies.items():
            tensor.grad = grads[name].detach().to(tensor.dtype).clone()
        optimizer.step()
        updates = {n: (copies[n].detach() - params[n]) for n in copies}
        return updates, TorchOptimizerState(tree_clone(optimizer.state_dict()))

    return GradientTransformation(init, update, AGGREGATE)


def _rate(learning_rate: LearningRate, count: int) -> float:
    return float(learning_rate(count)) if callable(learning_rate) else float(learning_rate)


def _check_learning_rate(learning_rate: LearningRate) -> None:
    if callable(learning_rate):
        return
    if not isinstance(learning_rate, (int, float)) or not 0 <= learning_rate < math.inf:
        raise ValueError(
            f"learning_rate must be a finite number >= 0 or a schedule, got {learning_rate!r}"
        )

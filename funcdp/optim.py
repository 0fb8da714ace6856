"""Functional optimizers as transforms on the aggregated gradient, and a `torch.optim` adapter.

An optimizer maps the privatized gradient to the update to ADD to the parameters
(`apply_updates`), as in optax. Learning rates are numbers or schedules `fn(step) -> float`.
Optimizers only post-process the privatized gradient, so they cost no privacy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcdp._checks import _is_real, check_positive
from funcdp.transforms.base import AGGREGATE, GradientTransformation
from funcdp.tree import tree_add, tree_clone, tree_map, tree_scale, tree_zeros_like

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
    """Stochastic gradient descent, with optional (Nesterov) heavy-ball momentum.

    Raises:
      ValueError: learning_rate is not a finite number >= 0 or a schedule, or momentum is not in
        [0, 1); at update time, a schedule returned something other than a finite number >= 0.
    """
    _check_learning_rate(learning_rate)
    _check_beta("momentum", momentum)

    def init(params):
        return SgdState(0, tree_zeros_like(params) if momentum else ())

    def update(grads, state, params=None, *, key=None, mask=None):
        del params, key, mask
        lr = _rate(learning_rate, state.count)
        if not momentum:
            return tree_scale(grads, -lr), SgdState(state.count + 1, ())
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
    """Adam (Kingma & Ba 2015) with bias correction.

    Raises:
      ValueError: as `adamw`.
    """
    return adamw(learning_rate, b1, b2, eps, weight_decay=0.0)


def adamw(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> GradientTransformation:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019); needs `params` in update.

    Raises:
      ValueError: learning_rate is not a finite number >= 0 or a schedule, b1 or b2 is not in
        [0, 1), eps is not a finite number > 0, or weight_decay is not a finite number >= 0; at
        update time, a schedule returned something other than a finite number >= 0.
    """
    _check_learning_rate(learning_rate)
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    check_positive("eps", eps)
    if not _is_real(weight_decay) or not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")

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
    """New parameters `params + updates`, in each parameter's dtype (`tree_add`: one fused op)."""
    return tree_add(params, tree_map(lambda p, u: u.to(p.dtype), params, updates))


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
    """The learning rate at step `count`; raises (before any update) on a bad schedule value."""
    if not callable(learning_rate):
        return float(learning_rate)
    value = learning_rate(count)
    rate = value.item() if _is_scalar_tensor(value) else value
    if (
        not isinstance(rate, numbers.Real)
        or isinstance(rate, bool)
        or not 0.0 <= float(rate) < math.inf  # also refuses NaN
    ):
        raise ValueError(
            f"learning_rate schedule must return a finite number >= 0, got {value!r} at step "
            f"{count}"
        )
    return float(rate)


def _is_scalar_tensor(value: Any) -> bool:
    """A one-element real tensor (a schedule may compute its rate with torch)."""
    return (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        and not value.dtype.is_complex
        and value.dtype != torch.bool
    )


def _check_learning_rate(learning_rate: LearningRate) -> None:
    if callable(learning_rate):
        return
    if not _is_real(learning_rate) or not 0 <= learning_rate < math.inf:
        raise ValueError(
            f"learning_rate must be a finite number >= 0 or a schedule, got {learning_rate!r}"
        )


def _check_beta(name: str, beta: float) -> None:
    if not _is_real(beta) or not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta!r}")

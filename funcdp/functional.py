"""Turn an `nn.Module` into a pure function of (params, buffers, inputs)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]
ApplyFn = Callable[..., Any]


def functionalize(module: nn.Module) -> tuple[ApplyFn, Params, Params]:
    """Splits `module` into a pure function and the tensors it reads.

    Only parameters with `requires_grad` are returned in `params` (they are what training
    changes); frozen parameters stay on the module, so they get no per-example gradient and cost
    no memory. Both dicts are keyed as in `named_parameters()` / `named_buffers()` and hold
    detached copies: training never mutates `module`.

    Args:
      module: any module whose forward treats the examples of a batch independently.

    Returns:
      `(apply_fn, params, buffers)` where `apply_fn(params, buffers, *args, **kwargs)` runs the
      module's forward with those tensors.

    Raises:
      ValueError: the module mixes examples (BatchNorm in training mode); the message names the
        submodule and points to `funcdp.validate` / `funcdp.fix`.
    """
    _refuse_example_mixing(module)
    params = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    trainable = frozenset(params)

    def apply_fn(params: Params, buffers: Params, *args: Any, **kwargs: Any) -> Any:
        missing = trainable.difference(params)
        if missing:
            raise ValueError(
                f"params is missing the trainable parameter(s) {sorted(missing)}: the module would "
                "silently use its own, untrained tensors for them"
            )
        return functional_call(module, (params, buffers), args, kwargs, tie_weights=True)

    return apply_fn, params, buffers


def to_module(module: nn.Module, state: Any) -> nn.Module:
    """A copy of `module` holding the trained parameters and buffers of `state`.

    `state` is a `TrainState` (or anything with `params` and `buffers` dicts). The result is a
    plain PyTorch module to save with `state_dict()` and deploy as usual.
    """
    trained = copy.deepcopy(module)
    tensors = {**dict(state.buffers or {}), **dict(state.params)}
    # named_buffers, unlike state_dict, includes non-persistent buffers, as functionalize does.
    own = dict(trained.named_parameters()) | dict(trained.named_buffers())
    missing = set(tensors) - set(own)
    if missing:
        raise ValueError(f"state holds tensors the module does not have: {sorted(missing)}")
    wrong = {
        n: (tuple(v.shape), tuple(own[n].shape))
        for n, v in tensors.items()
        if v.shape != own[n].shape
    }
    if wrong:
        raise ValueError(
            f"state tensors do not fit the module (name: (state shape, module shape)): {wrong}"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)
    return trained


def _refuse_example_mixing(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            raise ValueError(
                f"submodule '{name or type(module).__name__}' ({type(sub).__name__}) is in training "
                "mode: batch normalization mixes the examples of a batch, so one example's gradient "
                "depends on the others and per-example clipping no longer bounds its influence. "
                "Call funcdp.fix(module) to replace it with GroupNorm (funcdp.validate(module) lists "
                "every problem), or put it in eval mode to use its running statistics."
            )

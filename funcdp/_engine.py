"""How a micro-batch becomes what the privatizer sums: per-example gradients, or a ghost sum.

The train step picks one of these per micro-batch: `per_example_fn` (vmap over examples, with
optional autocast) hands per-example gradients to the privatizer's per-example part;
the function `ghost_sum_fn` builds applies the privatizer's clipping rule itself and returns the
clipped sum, never forming the per-example gradients of the layers `funcdp.ghost` handles.
"""

from __future__ import annotations

from collections.abc import Callable

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from funcdp.ghost import ghost_clipped_sum
from funcdp.per_sample import per_sample_grads_and_losses
from funcdp.transforms.base import AGGREGATE, REDUCE, FactorRule, bind_parts
from funcdp.tree import per_example_norms, tree_map, upcast_half


def autocast_loss(loss_fn: Callable[..., torch.Tensor], dtype: torch.dtype | None):
    """`loss_fn` run under `torch.autocast(dtype)` on its parameters' device, loss in float32."""
    if dtype is None:
        return loss_fn

    def loss(params, buffers, *example):
        leaves = [p for p in optree.tree_leaves(params) if isinstance(p, torch.Tensor)]
        device_type = leaves[0].device.type if leaves else "cpu"
        with torch.autocast(device_type, dtype=dtype), _NormsInFloat32(device_type):
            value = loss_fn(params, buffers, *example)
        return value.float()

    return loss


class _NormsInFloat32(TorchFunctionMode):
    """Runs layer_norm and instance_norm on a float32 input with autocast off.

    Autocast computes them in float32 anyway; but handed a half-precision input and float32
    affine parameters, torch's batched backward of these two fails under vmap(grad) ("expected
    scalar type BFloat16 but found Float", torch 2.13), so the input is widened first.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        half = (torch.float16, torch.bfloat16)
        if func in (F.layer_norm, F.instance_norm) and args and args[0].dtype in half:
            with torch.autocast(self.device_type, enabled=False):
                return func(args[0].float(), *args[1:], **kwargs)
        return func(*args, **kwargs)


def ghost_rule(privatizer, mode) -> FactorRule | None:
    """The clipping rule the ghost mode applies, or None for the vmap path.

    "ghost" refuses what it can't do; "auto" takes ghost where it can and vmap otherwise.
    """
    if mode not in ("auto", "vmap", "ghost"):
        raise ValueError(f'mode must be "auto", "vmap" or "ghost", got {mode!r}')
    if mode == "vmap":
        return None
    bound, _ = bind_parts(privatizer.parts or (privatizer,))
    head = [part for part in bound if part.stage != AGGREGATE]
    if len(head) != 2 or head[0].factor_rule is None or head[1].stage != REDUCE:
        if mode == "auto":
            return None
        raise ValueError(
            'mode="ghost" needs a privatizer that starts with ONE stateless clipping transform '
            "(clip, clip_by, clip_per_layer, normalize_per_example, without nan_safe) and "
            "aggregate(); use on_nonfinite='zero' instead of nan_safe"
        )
    rule = head[0].factor_rule
    if rule.groups is None:  # one group: the rule sees norms [B, 1], as inside clip_by
        return FactorRule(rule.factor_fn, lambda path: "all", ("all",))
    return rule


def ghost_sum_fn(rule: FactorRule, example_loss, chunk_size, on_nonfinite):
    """`fn(state, rows, mask) -> (clipped masked sum, losses [B], norms [B])` by ghost clipping.

    Built once per train step so that the ghost probe runs once per batch signature; the
    state's buffers reach the loss through `current`, set at each call.
    """
    current = {}
    ghost_fn = ghost_clipped_sum(
        lambda params, *example: example_loss(params, current["buffers"], *example),
        factor_fn=rule.factor_fn,
        groups=rule.groups,
        group_names=rule.group_names,
        chunk_size=chunk_size,
        zero_nonfinite=on_nonfinite == "zero",
    )

    def fn(state, rows, mask):
        current["buffers"] = state.buffers
        result = ghost_fn(state.params, *rows, mask=mask)
        return result.grads, result.losses.detach(), result.norms.detach()

    return fn


def per_example_fn(example_loss: Callable[..., torch.Tensor], upcast: bool):
    """`fn(params, buffers, chunk, *rows) -> (grads [B, ...], losses [B], norms [B])`."""

    def per_example(params, buffers, chunk, *rows):
        grads, loss = per_sample_grads_and_losses(
            lambda p, *example: example_loss(p, buffers, *example), chunk_size=chunk
        )(params, *rows)
        if upcast:  # half-precision gradients (of half parameters) are clipped in float32
            grads = tree_map(upcast_half, grads)
        return grads, loss.detach(), per_example_norms(grads).detach()

    return per_example

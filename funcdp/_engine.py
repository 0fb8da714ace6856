"""The train step's engine: a batch's clipped sum, micro-batch by micro-batch.

`local_sum_fn` builds `local_sum(state, inputs, mask, key) -> LocalSum`, this process's share of
a step up to and including `aggregate()`. Per micro-batch it takes one of two engines:
`per_example_fn` (vmap over examples, with optional autocast) hands per-example gradients to the
privatizer's per-example part; `ghost_sum_fn` applies the privatizer's clipping rule itself and
returns the clipped sum, never forming the per-example gradients of the layers `funcdp.ghost`
handles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from funcdp import random as fdr
from funcdp.ghost import ghost_clipped_sum
from funcdp.memory import auto_chunk_size, is_auto
from funcdp.per_sample import per_sample_grads_and_losses
from funcdp.performance import Performance
from funcdp.transforms.base import AGGREGATE, REDUCE, FactorRule, Split
from funcdp.transforms.clipping import grouped_norms
from funcdp.tree import per_example_norms, tree_add, tree_map, upcast_half


class LocalSum(NamedTuple):
    """This process's share of a step: the sum through aggregate(), and what the metrics need.

    `nonfinite` counts real examples refused in "raise"/"skip" mode; then total and stats are
    None and the step is refused.
    """

    total: Any
    pre_state: tuple
    stats: torch.Tensor | None
    nonfinite: int


def local_sum_fn(loss_fn, split: Split, performance: Performance, on_nonfinite: str):
    """`local_sum(state, inputs, mask, key) -> LocalSum` over micro-batches.

    Micro-batch k hands the privatizer's per-example part the key `fold_in(key, k)`, so a
    transform that draws randomness draws anew in each micro-batch.
    """
    through_sum = split.through_sum
    rule = ghost_rule(through_sum.parts, performance.mode)
    example_loss = autocast_loss(loss_fn, performance.autocast_dtype)
    ghost_sum = (
        None
        if rule is None
        else ghost_sum_fn(rule, example_loss, performance.chunk_size, on_nonfinite)
    )
    per_example = per_example_fn(example_loss, performance.autocast_dtype is not None)
    chunk_for = _chunk_chooser(example_loss, performance.chunk_size)
    clipped_by = _clipped_fn(clip_rule(through_sum.parts), split.context.sensitivity)

    def local_sum(state, inputs, mask: torch.Tensor, key) -> LocalSum:
        size = mask.shape[0]
        micro = performance.microbatch_size or size
        total, losses, norms, finite, clipped = None, [], [], [], []
        pre_state, _ = split.halves(state.privacy_state)
        for index, start in enumerate(range(0, size, micro)):
            rows = slice(start, start + micro)
            part = tuple(x[rows] for x in inputs)
            if ghost_sum is not None:
                summed, loss, norm, cut = ghost_sum(state, part, mask[rows])
            else:
                chunk = chunk_for(state, part)
                grads, loss, norm = per_example(state.params, state.buffers, chunk, *part)
                cut = clipped_by(grads, norm)
            ok = (torch.isfinite(loss) & torch.isfinite(norm)) | ~mask[rows].to(loss.device)
            if on_nonfinite != "zero" and not bool(ok.all()):
                return LocalSum(None, pre_state, None, int((~ok).sum()))
            if ghost_sum is None:  # a non-finite example ("zero") is left out like padding
                real = mask[rows] & ok.to(mask.device)
                summed, pre_state = through_sum.update(
                    grads, pre_state, state.params, key=fdr.fold_in(key, index), mask=real
                )
            total = summed if total is None else tree_add(total, summed)
            losses.append(loss)
            norms.append(norm)
            finite.append(ok)
            clipped.append(cut)
        stats = _stats(
            torch.cat(losses), torch.cat(norms), mask, torch.cat(finite), torch.cat(clipped)
        )
        return LocalSum(total, pre_state, stats, 0)

    return local_sum


def _chunk_chooser(example_loss, chunk_size):
    """`chunk_for(state, rows)`: the vmap chunk, measured once per shape for "auto"."""
    chosen: dict[tuple, int] = {}

    def chunk_for(state, rows):
        if not is_auto(chunk_size):
            return chunk_size
        shapes = tuple((tuple(x.shape), x.dtype) for x in rows)
        if shapes not in chosen:
            probe = lambda params, *example: example_loss(params, state.buffers, *example)  # noqa: E731
            chosen[shapes] = auto_chunk_size(probe, state.params, *rows, spec=chunk_size)
        return chosen[shapes]

    return chunk_for


def _clipped_fn(rule: FactorRule | None, clip_norm):
    """`clipped(grads, norms) -> [B] bool`: the examples the clip scales down. From the factor
    rule where the privatizer has one (any group's factor below 1, as the rule computes it);
    else, as an estimate, the examples whose norm exceeds the sensitivity."""
    if rule is None:
        return lambda grads, norms: norms > clip_norm if clip_norm is not None else norms < 0
    names = rule.group_names

    def clipped(grads, norms):
        del norms
        group_norms, _ = grouped_norms(grads, rule.groups, names)
        return (rule.factor_fn(group_norms) < 1).any(1)

    return clipped


def _stats(losses, norms, mask, finite, clipped) -> torch.Tensor:
    """Sums behind the metrics, [real, counted, loss, clipped, norm], summable across ranks."""
    mask = mask.to(losses.device)
    counted = mask & finite  # real rows with a finite loss and gradient
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    clipped = clipped.to(mask.device) & counted
    return torch.stack(
        [
            mask.sum().to(losses.dtype),
            counted.sum().to(losses.dtype),
            torch.where(counted, losses, zero).sum(),
            clipped.sum().to(losses.dtype),
            torch.where(counted, norms.to(losses.dtype), zero).sum(),
        ]
    )


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


def clip_rule(bound) -> FactorRule | None:
    """The factor rule of bound parts that are ONE stateless clipping transform and
    `aggregate()`, with one group named "all" for flat rules; None for any other privatizer."""
    head = [part for part in bound if part.stage != AGGREGATE]
    if len(head) != 2 or head[0].factor_rule is None or head[1].stage != REDUCE:
        return None
    rule = head[0].factor_rule
    if rule.groups is None:  # one group: the rule sees norms [B, 1], as inside clip_by
        return FactorRule(rule.factor_fn, lambda path: "all", ("all",))
    return rule


def ghost_rule(bound, mode) -> FactorRule | None:
    """The clipping rule the ghost mode applies to the bound parts through `aggregate()`, or
    None for the vmap path.

    "ghost" refuses what it can't do; "auto" takes ghost where it can and vmap otherwise.
    """
    rule = None if mode == "vmap" else clip_rule(bound)
    if rule is None and mode == "ghost":
        raise ValueError(
            'mode="ghost" needs a privatizer that starts with ONE stateless clipping transform '
            "(clip, clip_by, clip_per_layer, normalize_per_example) and aggregate()"
        )
    return rule


def ghost_sum_fn(rule: FactorRule, example_loss, chunk_size, on_nonfinite):
    """`fn(state, rows, mask) -> (clipped masked sum, losses [B], norms [B], clipped [B])` by
    ghost clipping.

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
        return result.grads, result.losses.detach(), result.norms.detach(), result.clipped

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

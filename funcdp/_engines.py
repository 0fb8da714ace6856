"""The clipped sum of a batch, by one of three engines: the one interface behind every step.

`make_engine(loss_fn, split, performance)` builds `engine(params, buffers, rows, mask,
state, key) -> (ClippedSum, state)` for the part of a privatizer that runs through `aggregate()`.
Where that part is ONE stateless clipping transform, the engine applies the transform's factor
rule (norms [B, G] of the groups of leaves to factors [B, G], `transforms/clipping.py`) itself,
by the engine `Performance.mode` picks:

- "vmap": every example's gradient by `vmap(grad)`, its group norms once, scaled and summed;
- "ghost": no per-example gradient for the layers `funcdp.ghost` handles;
- "two_pass": per-example gradients chunk by chunk, twice (norms, then scaled sums), so memory
  holds one chunk's gradients.

Any other per-example part (adaptive clipping, a user's transform) gets the vmapped gradients
and runs its own `update`. `clipped_sum(loss_fn, ...)` hands users the same engines.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from funcdp._autocast import autocast_loss
from funcdp._certify import matmul_roundoff, norms_upper, with_margin
from funcdp._checks import check_mask, check_positive
from funcdp._pieces import piece
from funcdp.ghost import ghost_clipped_sum
from funcdp.ghost.rows import per_example_fn as rows_apart
from funcdp.ghost.rows import total_squares
from funcdp.memory import examples_in_budget, is_auto
from funcdp.performance import Performance
from funcdp.transforms.aggregation import aggregate
from funcdp.transforms.base import (
    AGGREGATE,
    REDUCE,
    FactorRule,
    GradientTransformation,
    Split,
    split_at_reduce,
)
from funcdp.transforms.base import chain as _chain
from funcdp.transforms.clipping import clip, group_squares
from funcdp.tree import (
    all_finite,
    finite,
    per_example_norms,
    tree_add,
    tree_map,
    tree_unflatten,
    upcast_half,
    zero_rows,
)


class ClippedSum(NamedTuple):
    """A batch's clipped sum and what a step's metrics read.

    Attributes:
      grads: the sum over the real rows (mask true) of the clipped per-example gradients.
      losses: [B], each example's loss as computed.
      norms: [B], an upper bound on each example's gradient norm; 0 on padded rows.
      clipped: [B] bool, the real examples the clipping rule scaled down.
      finite: [B] bool, false for a real example whose loss or gradient norm is not finite.
    """

    grads: Any
    losses: torch.Tensor
    norms: torch.Tensor
    clipped: torch.Tensor
    finite: torch.Tensor


Engine = Callable[..., tuple[ClippedSum, Any]]


def clipped_sum(
    loss_fn: Callable[..., torch.Tensor],
    *,
    max_norm: float | None = None,
    clipping: GradientTransformation | None = None,
    mode: str = "vmap",
    chunk_size: Any = None,
) -> Callable[..., ClippedSum]:
    """Returns `fn(params, buffers, *batch, mask=None) -> ClippedSum`, the clipped sum of a batch.

    The same engines as the train step's, for custom loops: `loss_fn(params, buffers, *example)`
    is the loss of ONE example, as `make_train_step` takes it. Padded rows (mask false) are
    left out exactly.

    Args:
      loss_fn: the scalar loss of one example.
      max_norm: flat clipping at C (exclusive with `clipping`).
      clipping: a stateless clipping transform: `clip`, `clip_per_layer`, `clip_by` (a user's
        factor rule from norms [B, G] to factors [B, G]) or `normalize_per_example`.
      mode: "vmap", "ghost", "two_pass" or "auto" (see `funcdp.Performance`).
      chunk_size: examples per vmap chunk (two-pass: per pass-2 chunk, default 32), or "auto".

    Raises:
      ValueError: neither or both of max_norm and clipping, max_norm <= 0, a transform that is
        not a stateless clipping transform, an unknown mode or chunk size.
    """
    if (max_norm is None) == (clipping is None):
        raise ValueError("clipped_sum takes exactly one of max_norm and clipping")
    if max_norm is not None:
        check_positive("max_norm", max_norm)
        clipping = clip(max_norm)
    if not isinstance(clipping, GradientTransformation) or clipping.factor_rule is None:
        raise ValueError(
            "clipping must be a stateless clipping transform (clip, clip_per_layer, clip_by, "
            f"normalize_per_example), got {clipping!r}"
        )
    performance = Performance(mode=mode, chunk_size=chunk_size).check()
    split = split_at_reduce(_chain(clipping, aggregate()))
    engine = make_engine(loss_fn, split, performance, zero_nonfinite=False)

    def fn(params, buffers, *batch, mask=None) -> ClippedSum:
        if not batch or batch[0].dim() == 0:
            raise ValueError("clipped_sum needs at least one batched argument")
        size = batch[0].shape[0]
        mask = torch.ones(size, dtype=torch.bool, device=batch[0].device) if mask is None else mask
        check_mask(mask, size)
        return engine(params, buffers, batch, mask, (), None)[0]

    return fn


def make_engine(loss_fn, split: Split, performance: Performance, *, zero_nonfinite) -> Engine:
    """The engine for the part of a privatizer through `aggregate()` (`split.through_sum`).

    With `zero_nonfinite`, a real example whose loss or norm is not finite is left out of the
    sum like a padded row; otherwise it poisons the sum and the caller refuses the batch.
    """
    rule = clip_rule(split.head)
    mode = performance.mode
    if rule is None and mode in ("ghost", "two_pass"):
        raise ValueError(
            f'mode="{mode}" needs a privatizer that starts with ONE stateless clipping transform '
            "(clip, clip_by, clip_per_layer, normalize_per_example) and aggregate()"
        )
    example_loss = autocast_loss(loss_fn, performance.autocast_dtype)
    if rule is not None and mode == "two_pass":
        return _two_pass_engine(rule, example_loss, performance.chunk_size or 32, zero_nonfinite)
    upcast = performance.autocast_dtype is not None
    per_example = _per_example_fn(example_loss, performance.chunk_size, upcast)
    if rule is None:
        return _transform_engine(split, per_example, zero_nonfinite)
    vmapped = _vmap_engine(rule, per_example, zero_nonfinite)
    if mode == "vmap":
        return vmapped
    ghost = _ghost_engine(rule, example_loss, performance.chunk_size, zero_nonfinite)
    return ghost if mode == "ghost" else _auto_engine(ghost, vmapped)


def _auto_engine(ghost: Engine, vmapped: Engine) -> Engine:
    """Ghost clipping where it runs, vmap where it cannot: a loss that ghost clipping's capture
    cannot follow (a `vmap` inside the loss, a path that changes between examples) raises on its
    first batch of an example shape, and that shape takes the vmap engine from then on (whatever
    the number of rows), with a warning."""
    chosen: dict[tuple, Engine] = {}

    def engine(params, buffers, rows, mask, state, key):
        shapes = tuple((tuple(x.shape[1:]), x.dtype) for x in rows)
        if shapes in chosen:
            return chosen[shapes](params, buffers, rows, mask, state, key)
        try:
            out = ghost(params, buffers, rows, mask, state, key)
        except RuntimeError as error:
            if torch.compiler.is_compiling():
                raise
            warnings.warn(
                "mode='auto': ghost clipping could not run this loss, so it takes vmap (set "
                f"Performance(mode='vmap') to skip this try): {str(error).splitlines()[0]}",
                stacklevel=2,
            )
            chosen[shapes] = vmapped
            return vmapped(params, buffers, rows, mask, state, key)
        chosen[shapes] = ghost
        return out

    return engine


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


def _ghost_engine(rule: FactorRule, example_loss, chunk_size, zero_nonfinite) -> Engine:
    """Ghost clipping; built once so that its probe runs once per batch signature. The loss
    reads the call's buffers through `current` (its one key set from the start: a compiled step
    guards on the dict's keys and would recompile for a key added on the first call)."""
    current = {"buffers": None}
    ghost_fn = ghost_clipped_sum(
        lambda params, *example: example_loss(params, current["buffers"], *example),
        factor_fn=rule.factor_fn,
        groups=rule.groups,
        group_names=rule.group_names,
        chunk_size=chunk_size,
        zero_nonfinite=zero_nonfinite,
    )

    def engine(params, buffers, rows, mask, state, key):
        del key
        current["buffers"] = buffers
        result = ghost_fn(params, *rows, mask=mask)
        losses, norms = result.losses.detach(), result.norms.detach()
        finite = _finite(losses, norms, mask)
        clipped = result.clipped.to(mask.device)
        return ClippedSum(result.grads, losses, norms, clipped, finite), state

    return engine


def _vmap_engine(rule: FactorRule, per_example, zero_nonfinite) -> Engine:
    def engine(params, buffers, rows, mask, state, key):
        del key
        _, losses, (leaves, spec, columns, squares) = per_example(
            params, buffers, rows, mask, lambda g: group_squares(g, rule.groups, rule.group_names)
        )
        return _apply_rule(
            rule, leaves, spec, columns, squares, losses, mask, zero_nonfinite
        ), state

    return engine


def _two_pass_engine(rule: FactorRule, example_loss, chunk_size, zero_nonfinite) -> Engine:
    """Pass 1: every example's group norms, chunk by chunk. Pass 2: each chunk's gradients
    again, scaled by factors from the larger of both passes' bounds (a kernel need not repeat
    bit for bit) and summed. Padded rows are computed too: an example's gradient must not
    depend on which other rows are real (a kernel chosen by the number of rows can round
    differently). Both passes must see the same function: random layers raise."""

    gradients = rows_apart(example_loss, randomness="error")

    def measure(grads):
        return group_squares(grads, rule.groups, rule.group_names)

    def first_pass(params, buffers, rows, mask):
        _, losses, measured = gradients(params, buffers, rows, mask, None, measure)
        return measured[3], losses

    def second_pass(params, buffers, rows, mask, first):
        _, _, (leaves, spec, columns, again) = gradients(params, buffers, rows, mask, None, measure)
        bound = torch.maximum(first[0], again)
        return _apply_rule(rule, leaves, spec, columns, bound, first[1], mask, zero_nonfinite)

    chosen: dict[tuple, int] = {}  # chunk_size="auto": measured once per row shapes

    def engine(params, buffers, rows, mask, state, key):
        del key
        size = mask.shape[0]
        chunk = min(_chunk(chunk_size, chosen, example_loss, params, buffers, rows), size)
        # Chunks of one shape (the last one padded, masked out); helpers, so that a chunk's
        # gradients are freed before the next chunk's are formed.
        chunks = [piece(rows, mask, start, chunk) for start in range(0, size, chunk)]
        first = [first_pass(params, buffers, *chunk) for chunk in chunks]
        total, parts = None, []
        for (chunk_rows, chunk_mask), bound in zip(chunks, first, strict=True):
            part = second_pass(params, buffers, chunk_rows, chunk_mask, bound)
            total = part.grads if total is None else tree_add(total, part.grads)
            parts.append(part._replace(grads=None))
        merged = [torch.cat([getattr(p, f) for p in parts])[:size] for f in ClippedSum._fields[1:]]
        return ClippedSum(total, *merged), state

    return engine


def _transform_engine(split: Split, per_example, zero_nonfinite) -> Engine:
    """Any per-example part: it sees the gradients and runs its own update. `clipped` is then
    an estimate, the examples whose norm exceeds the declared sensitivity."""
    through_sum, sensitivity = split.through_sum, split.head[0].sensitivity

    def engine(params, buffers, rows, mask, state, key):
        grads, losses, _ = per_example(params, buffers, rows, mask, lambda g: (total_squares(g),))
        norms = per_example_norms(grads).detach()
        finite = _finite(losses, norms, mask)
        real = mask & finite if zero_nonfinite else mask  # left out like padding
        summed, state = through_sum.update(grads, state, params, key=key, mask=real)
        over = norms > sensitivity if sensitivity is not None else torch.zeros_like(real)
        return ClippedSum(summed, losses, _zeroed(norms, mask), over & real, finite), state

    return engine


def _apply_rule(rule, leaves, spec, columns, squares, losses, mask, zero_nonfinite) -> ClippedSum:
    """The rule's factors from certified group norms, and the scaled sum over the real rows
    (in float32 or wider, with the rounding margin of the products)."""
    group_norms = norms_upper(squares, len(leaves), leaves)
    norms = norms_upper(squares.sum(1), len(leaves), leaves)
    mask = mask.to(norms.device)
    finite = _finite(losses, norms, mask)
    real = mask & finite if zero_nonfinite else mask
    zero = torch.zeros((), dtype=norms.dtype, device=norms.device)
    factors = rule.factor_fn(torch.where(real[:, None], group_norms, zero))
    if not isinstance(factors, torch.Tensor) or tuple(factors.shape) != tuple(squares.shape):
        raise ValueError(
            f"factor_fn must return a tensor of shape {tuple(squares.shape)} (examples, "
            f"groups), got {getattr(factors, 'shape', type(factors).__name__)}"
        )
    factors = torch.where(real[:, None], factors, zero)
    summed = [
        _weighted_sum(leaf, factors[:, column])
        for leaf, column in zip(leaves, columns, strict=True)
    ]
    if torch.compiler.is_compiling() or not all_finite(summed):
        # 0 * inf is NaN: a left-out row (padded, or not finite) held inf or NaN; select it
        # away. A compiled step always selects (one fused pass there, and no data-dependent branch).
        summed = [
            _weighted_sum(zero_rows(leaf, real), factors[:, column])
            for leaf, column in zip(leaves, columns, strict=True)
        ]
    clipped = (factors < 1).any(1) & real
    return ClippedSum(tree_unflatten(spec, summed), losses, _zeroed(norms, mask), clipped, finite)


def _weighted_sum(leaf: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """sum_i factors[i] leaf[i] as one matrix product (no scaled copy of the per-example
    gradients), in float32 or wider; the factors carry the product's rounding margin."""
    flat = upcast_half(leaf).reshape(leaf.shape[0], -1)
    scale = with_margin(factors, matmul_roundoff(flat.dtype, flat.device)).to(flat.dtype)
    return (scale @ flat).reshape(leaf.shape[1:])


def _finite(losses, norms, mask) -> torch.Tensor:
    mask = mask.to(losses.device)
    return (finite(losses) & finite(norms.to(losses.device))) | ~mask


def _zeroed(norms, mask) -> torch.Tensor:
    return torch.where(mask.to(norms.device), norms, torch.zeros((), dtype=norms.dtype))


def _chunk(chunk_size, chosen: dict, example_loss, params, buffers, rows):
    """`chunk_size`, or for "auto" the chunk measured once per row shapes (kept in `chosen`),
    up to the batch's size: an eager step's batches vary in size."""
    if not is_auto(chunk_size):
        return chunk_size
    shapes = tuple((tuple(x.shape[1:]), x.dtype) for x in rows)
    if shapes not in chosen:
        probe = lambda p, *example: example_loss(p, buffers, *example)  # noqa: E731
        chosen[shapes] = examples_in_budget(probe, params, *rows, spec=chunk_size)
    return min(chosen[shapes], rows[0].shape[0])


def _per_example_fn(example_loss, chunk_size, upcast: bool):
    """`fn(params, buffers, rows, mask, measure) -> (grads [B, ...], losses [B], measured)`, in
    vmap chunks ("auto": measured once per shape), no example's gradient rounded by its row:
    `measured` is `measure(grads)`, a tuple ending in the squares [B, G] that
    `funcdp.ghost.rows` reads."""
    chosen: dict[tuple, int | None] = {}
    gradients = rows_apart(example_loss)

    def per_example(params, buffers, rows, mask, measure):
        chunk = _chunk(chunk_size, chosen, example_loss, params, buffers, rows)

        def upcast_then_measure(grads):
            if upcast:  # half-precision gradients (of half parameters) are clipped in float32
                grads = tree_map(upcast_half, grads)
            return grads, *measure(grads)

        _, losses, (grads, *measured) = gradients(
            params, buffers, rows, mask, chunk, upcast_then_measure
        )
        return grads, losses, measured

    return per_example

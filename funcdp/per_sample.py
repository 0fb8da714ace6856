"""Per-example gradients as `vmap(grad(loss))`, with no per-layer registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, grad_and_value, vmap

from funcdp._certify import unit_roundoff, with_margin
from funcdp._checks import check_positive
from funcdp._rules import flat_factors
from funcdp.ghost import ghost_clipped_sum
from funcdp.memory import (
    ChunkSize,
    auto_chunk_size,
    check_chunk_option,
    check_chunk_size,
    is_auto,
)
from funcdp.tree import per_example_norms, tree_map, upcast_half, zero_rows

LossFn = Callable[..., Any]


def per_sample_grads(
    loss_fn: LossFn, *, chunk_size: ChunkSize = None, has_aux: bool = False
) -> Callable[..., Any]:
    """Returns `fn(params, *batch)` giving the gradient of `loss_fn` for each example.

    `loss_fn(params, *example)` computes the loss of ONE example (no batch dimension). The
    returned function differentiates its first argument and maps over the leading dimension of
    every other argument, so each leaf of the result has shape [B, *param.shape].

    Args:
      loss_fn: scalar loss of one example; with `has_aux`, returns `(loss, aux)`.
      chunk_size: evaluate at most this many examples at once to bound activation memory;
        "auto" or a `funcdp.memory.AutoChunk` picks the largest chunk under a memory budget,
        measured once per batch shape (see `funcdp.memory`).
      has_aux: return `(grads, aux)`, with aux stacked over examples.
    """
    check_chunk_option(chunk_size)
    probe = (lambda *args: loss_fn(*args)[0]) if has_aux else loss_fn
    return _over_examples(grad(loss_fn, has_aux=has_aux), chunk_size, probe)


def per_sample_grads_and_losses(
    loss_fn: LossFn, *, chunk_size: ChunkSize = None
) -> Callable[..., tuple[Any, torch.Tensor]]:
    """Like `per_sample_grads`, returning `(grads, losses)` with losses of shape [B]."""
    check_chunk_option(chunk_size)
    return _over_examples(grad_and_value(loss_fn), chunk_size, loss_fn)


def per_sample_norms(loss_fn: LossFn, *, chunk_size: int | None = None) -> Callable[..., Any]:
    """Returns `fn(params, *batch)` giving the L2 norm of each example's gradient, shape [B]."""
    grads_fn = per_sample_grads(loss_fn, chunk_size=chunk_size)

    def norms(params: Any, *batch: Any) -> torch.Tensor:
        return per_example_norms(grads_fn(params, *batch))

    return norms


def _over_examples(
    fn: Callable[..., Any], chunk_size: ChunkSize, probe: LossFn | None = None
) -> Callable[..., Any]:
    chosen: dict[tuple, int] = {}  # automatic chunk sizes, by batch shapes

    def mapped(params: Any, *batch: Any) -> Any:
        if not batch:
            raise ValueError("per-example functions need at least one batched argument")
        in_dims = (None,) + (0,) * len(batch)
        chunk = chunk_size
        if is_auto(chunk_size):
            shapes = tuple((tuple(x.shape), x.dtype) for x in batch)
            if shapes not in chosen:
                chosen[shapes] = auto_chunk_size(probe, params, *batch, spec=chunk_size)
            chunk = chosen[shapes]
        # Dropout and other random layers draw independently for each example.
        return vmap(fn, in_dims=in_dims, chunk_size=chunk, randomness="different")(params, *batch)

    return mapped


def clipped_sum(
    loss_fn: LossFn,
    *,
    max_norm: float | None = None,
    factor_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mode: str = "vmap",
    chunk_size: int | None = None,
) -> Callable[..., tuple[Any, torch.Tensor]]:
    """Returns `fn(params, *batch, mask=None) -> (sum_i c_i g_i, norms)` for a flat factor rule.

    c_i = min(1, max_norm / ||g_i||) (flat clipping), or `factor_fn(norms)` for another rule
    that scales a whole example by one factor (automatic clipping: R / (n + gamma); adaptive
    flat clipping). Padded rows (mask false) are left out; `norms` is [B] with 0 for them.

    - `mode="vmap"` materialises the per-example gradients [B, ...] (in `chunk_size` chunks of
      computation), then scales and sums them.
    - `mode="two_pass"` never holds more than `chunk_size` (default 32) per-example gradients:
      pass 1 computes the norms chunk by chunk and drops the gradients; pass 2 computes each
      chunk's gradients again, scales and sums them. (A weighted backward of sum_i c_i loss_i
      would be cheaper, but its rounding is not bounded by the norms of pass 1: with
      cancelling terms it can exceed the clip bound by any amount.) Both passes must see the
      same function, so `loss_fn` must be deterministic: random layers raise an error here.
    - `mode="ghost"` never forms the per-example gradients of linear, conv, embedding and
      normalization parameters: one batched forward and backward gives their norms from each
      op's input and output gradient, and their clipped sum from one more contraction
      (book-keeping); other parameters fall back to vmap. `params` must be a dict of tensors.
      See `funcdp.ghost.ghost_clipped_sum`, which also returns the losses and handles grouped
      (per-layer) factor rules.

    Raises:
      ValueError: neither or both of max_norm and factor_fn, max_norm <= 0, an unknown mode, or
        a bad chunk_size.
    """
    if (max_norm is None) == (factor_fn is None):
        raise ValueError("clipped_sum takes exactly one of max_norm and factor_fn")
    if max_norm is not None:
        check_positive("max_norm", max_norm)
        limit = float(max_norm)
        factor_fn = flat_factors(limit)
    if mode not in ("vmap", "two_pass", "ghost"):
        raise ValueError(f'mode must be "vmap", "two_pass" or "ghost", got {mode!r}')
    check_chunk_size(chunk_size)
    if mode == "vmap":
        return _clipped_sum_vmap(loss_fn, factor_fn, chunk_size)
    if mode == "ghost":
        return _clipped_sum_ghost(loss_fn, factor_fn, chunk_size)
    return _clipped_sum_two_pass(loss_fn, factor_fn, chunk_size or 32)


def _clipped_sum_vmap(loss_fn, factor_fn, chunk_size):
    grads_fn = per_sample_grads(loss_fn, chunk_size=chunk_size)

    def fn(params: Any, *batch: Any, mask: torch.Tensor | None = None):
        grads = grads_fn(params, *batch)
        norms = per_example_norms(grads)
        keep = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask.to(norms.device)
        summed = _scaled_sum(grads, factor_fn(norms), keep)
        return summed, torch.where(keep, norms, torch.zeros((), dtype=norms.dtype))

    return fn


def _scaled_sum(grads: Any, factors: torch.Tensor, keep: torch.Tensor) -> Any:
    """sum_i f_i g_i over the kept rows, in float32 or wider, with the rounding margin."""

    def weighted_sum(g: torch.Tensor) -> torch.Tensor:
        g = upcast_half(g)
        scale = with_margin(factors, unit_roundoff(g.dtype)).to(g.dtype)
        return zero_rows(g * scale.reshape((-1,) + (1,) * (g.dim() - 1)), keep).sum(0)

    return tree_map(weighted_sum, grads)


def _clipped_sum_two_pass(loss_fn, factor_fn, chunk_size):
    """Pass 1: every example's norm, chunk by chunk. Pass 2: each chunk's gradients again,
    scaled and summed. A factor comes from the larger of the two passes' norm bounds, so the
    scaled gradient is within its bound even where a kernel does not repeat bit for bit. Padded
    rows are computed too: an example's gradient must not depend on which other rows are real
    (a kernel chosen by the number of rows can round differently)."""
    example_grads = _deterministic(grad(loss_fn))

    def fn(params: Any, *batch: Any, mask: torch.Tensor | None = None):
        if not batch:
            raise ValueError("per-example functions need at least one batched argument")
        size = batch[0].shape[0]
        keep = torch.ones(size, dtype=torch.bool) if mask is None else mask
        chunks = [slice(start, start + chunk_size) for start in range(0, size, chunk_size)]
        norms = [per_example_norms(example_grads(params, *(x[c] for x in batch))) for c in chunks]
        total = tree_map(torch.zeros_like, params)
        for rows, norm in zip(chunks, norms, strict=True):
            grads = example_grads(params, *(x[rows] for x in batch))
            bound = torch.maximum(norm, per_example_norms(grads))
            real = keep[rows].to(bound.device)
            factors = torch.where(real, factor_fn(bound), torch.zeros((), dtype=bound.dtype))
            total = tree_map(torch.add, total, _scaled_sum(grads, factors, real))
        norms = torch.cat(norms)
        return total, torch.where(keep.to(norms.device), norms, torch.zeros((), dtype=norms.dtype))

    return fn


def _deterministic(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` mapped over the examples; random operations raise instead of drawing."""

    def mapped(params: Any, *batch: Any) -> Any:
        in_dims = (None,) + (0,) * len(batch)
        return vmap(fn, in_dims=in_dims, randomness="error")(params, *batch)

    return mapped


def _clipped_sum_ghost(loss_fn, factor_fn, chunk_size):
    ghost_fn = ghost_clipped_sum(loss_fn, factor_fn=factor_fn, chunk_size=chunk_size)

    def fn(params: Any, *batch: Any, mask: torch.Tensor | None = None):
        result = ghost_fn(params, *batch, mask=mask)
        return result.grads, result.norms

    return fn

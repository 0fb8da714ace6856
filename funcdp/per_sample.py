"""Per-example gradients as `vmap(grad(loss))`, with no per-layer registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, grad_and_value, vmap

from funcdp._pieces import in_whole_chunks
from funcdp.memory import (
    ChunkSize,
    auto_chunk_size,
    check_chunk_option,
    is_auto,
)
from funcdp.tree import per_example_norms

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
        mapped = vmap(fn, in_dims=in_dims, chunk_size=chunk, randomness="different")
        return in_whole_chunks(lambda *rows: mapped(params, *rows), chunk, *batch)

    return mapped

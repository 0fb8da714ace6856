"""The train step's engine: a batch's clipped sum, micro-batch by micro-batch.

`local_sum_fn` builds `local_sum(state, inputs, mask, key) -> LocalSum`, this process's share of
a step up to and including `aggregate()`: each micro-batch goes through the ONE engine that
`funcdp._engines.make_engine` picks for the privatizer and `Performance` (vmap, ghost or
two-pass), and the sums are added.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch

from funcdp import random as fdr
from funcdp._engines import make_engine
from funcdp._pieces import piece
from funcdp.performance import Performance
from funcdp.transforms.base import Split
from funcdp.tree import tree_add


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
    """`local_sum(state, inputs, mask, key, bucket_size=None) -> LocalSum` over micro-batches.

    The batch is computed in pieces of one size: `performance.microbatch_size`, or the batch's
    bucket (`Batch.bucket_size`) where that is smaller or no micro-batch size is set, or else the
    whole batch. A last piece shorter than the others is padded to their size. So every piece
    has the same shape, and no example's gradient depends on how many rows are real (a kernel
    chosen by the number of rows can round differently). A piece of padding only (after the
    first) is not computed: its contribution is exactly zero, so padding costs nothing beyond
    the piece that holds the last real row.

    Piece k hands the privatizer's per-example part the key `fold_in(key, k)`, so a transform
    that draws randomness draws anew in each piece. With `performance.compile`, the engine's
    work on one piece is compiled (`_compiled`): the pieces share its graph, however many a
    batch has, and the keys, the sums over pieces and the refusal run around it.
    """
    engine = make_engine(loss_fn, split, performance, zero_nonfinite=on_nonfinite == "zero")
    run = engine if performance.compile is False else _compiled(engine, performance.compile)

    piece_sizes: set[int] = set()  # seen so far: a second one is warned about, once

    def local_sum(state, inputs, mask: torch.Tensor, key, bucket_size: int | None = None):
        micro = min(performance.microbatch_size or mask.shape[0], bucket_size or mask.shape[0])
        if micro not in piece_sizes:
            piece_sizes.add(micro)
            if len(piece_sizes) == 2:
                warnings.warn(_MIXED_PIECES.format(*sorted(piece_sizes)), stacklevel=3)
        total, parts = None, []
        pre_state, _ = split.halves(state.privacy_state)
        for index, start in enumerate(range(0, mask.shape[0], micro)):
            rows, rows_mask = piece(inputs, mask, start, micro)
            if index and not bool(rows_mask.any()):
                continue
            part, pre_state = run(
                state.params, state.buffers, rows, rows_mask, pre_state, fdr.fold_in(key, index)
            )
            total = part.grads if total is None else tree_add(total, part.grads)
            parts.append((part, rows_mask))
        losses, norms, clipped, finite = (
            torch.cat([getattr(part, field) for part, _ in parts])
            for field in ("losses", "norms", "clipped", "finite")
        )
        if on_nonfinite != "zero":
            refused = int((~finite).sum())
            if refused:
                return LocalSum(None, pre_state, None, refused)
        computed = torch.cat([rows_mask for _, rows_mask in parts])
        return LocalSum(total, pre_state, _stats(losses, norms, computed, finite, clipped), 0)

    return local_sum


_MIXED_PIECES = (
    "this step has computed batches in pieces of {} and of {} rows: an example's rounding can "
    "then depend on how many others were sampled, which can move the sum by more than the clip "
    "norm (docs/sharp_edges.md). Give each Batch the bucket it was padded to "
    "(Batch(..., bucket_size=B), as PoissonLoader does) or set Performance(microbatch_size=)"
)


def _compiled(fn, compile):
    """`torch.compile(fn)` (with the options `compile` gives), traced as one graph: dynamo also
    traces `torch.autograd.grad`, the backward of the ghost pass, where it would split the graph
    and run the backward eagerly.

    The first call runs eagerly: it runs the ghost probe and fills the engines' caches, so the
    trace (on the second call) finds them filled. Traced on the first call, the probe would
    split the graph where it ran, for every later step.
    """
    compiled = torch.compile(fn, **({} if compile is True else compile))
    # A torch without this setting splits the graph there, which is slower, not wrong.
    traced = (
        {"trace_autograd_ops": True} if hasattr(torch._dynamo.config, "trace_autograd_ops") else {}
    )
    calls = 0

    def run(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(*args)
        with torch._dynamo.config.patch(**traced):
            return compiled(*args)

    return run


def _stats(losses, norms, mask, finite, clipped) -> torch.Tensor:
    """Sums behind the metrics, [real, counted, loss, clipped, norm], summable across ranks."""
    mask = mask.to(losses.device)
    counted = mask & finite.to(mask.device)  # real rows with a finite loss and gradient
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

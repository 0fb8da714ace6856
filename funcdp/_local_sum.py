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
from funcdp._autocast import autocast_loss
from funcdp._engines import make_engine
from funcdp._pieces import piece
from funcdp.ghost import capture
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

    Eager, where the loss's per-example gradients are row-free (`capture.row_free`, probed once
    per signature), the step computes the real rows only, in micro-batches of
    `performance.microbatch_size` (the last one shorter) or at once: padding costs nothing. An
    example's rounding may then depend on how many others were sampled, as it may on its row in
    any batch; every engine bounds that by computing alone each example whose gradient could be
    mostly rounding (`funcdp.ghost.rows`, `funcdp.ghost.matmul.settle`). But a piece of one row
    is computed as two (the second a masked copy), unless every piece has one row
    (`microbatch_size=1`): with several threads torch sums a long reduction whose output is one
    number in two passes, so a lone row's bias gradient over many positions rounds otherwise
    than the same row's among others (one crafted example moved a ghost sum by 1.02 C).

    Otherwise, and compiled (`performance.compile`, so that one graph serves every piece), each
    piece has one shape: `performance.microbatch_size`, or the batch's bucket
    (`Batch.bucket_size`) where that is smaller or no micro-batch size is set, or else the whole
    batch; a last piece shorter than the others is padded to their size, and a piece of padding
    only (after the first) is not computed. The engine's work on one piece is compiled
    (`_compiled`); the keys, the sums over pieces and the refusal run around it.

    Piece k hands the privatizer's per-example part the key `fold_in(key, k)`, so a transform
    that draws randomness draws anew in each piece.
    """
    engine = make_engine(loss_fn, split, performance, zero_nonfinite=on_nonfinite == "zero")
    example_loss = autocast_loss(loss_fn, performance.autocast_dtype)  # as the engine runs it
    run = engine if performance.compile is False else _compiled(engine, performance.compile)

    piece_sizes: set[int] = set()  # of one shape, seen so far: a second one is warned about, once
    free: dict[tuple, bool] = {}  # `capture.row_free`, by parameter and example signature

    def row_free(state, inputs) -> bool:
        key = capture.signature(state.params, inputs)
        if key not in free:
            loss = lambda params, *example: example_loss(params, state.buffers, *example)  # noqa: E731
            free[key] = capture.row_free(capture.plan(loss, state.params, inputs, vmap_all=True))
        return free[key]

    def pieces(state, inputs, mask: torch.Tensor, bucket_size: int | None):
        """The (rows, mask) pieces the engine computes, in order."""
        if performance.compile is False and row_free(state, inputs):
            rows, real = _real_rows(inputs, mask)
            micro = performance.microbatch_size or real.shape[0]
            for start in range(0, real.shape[0], micro):
                part = tuple(x[start : start + micro] for x in rows), real[start : start + micro]
                lone = part[1].shape[0] == 1 and performance.microbatch_size != 1
                yield piece(*part, 0, 2) if lone else part
            return
        micro = min(performance.microbatch_size or mask.shape[0], bucket_size or mask.shape[0])
        if micro not in piece_sizes:
            piece_sizes.add(micro)
            if len(piece_sizes) == 2:
                warnings.warn(_MIXED_PIECES.format(*sorted(piece_sizes)), stacklevel=4)
        for index, start in enumerate(range(0, mask.shape[0], micro)):
            rows, rows_mask = piece(inputs, mask, start, micro)
            if index == 0 or bool(rows_mask.any()):
                yield rows, rows_mask

    def local_sum(state, inputs, mask: torch.Tensor, key, bucket_size: int | None = None):
        total, parts = None, []
        pre_state, _ = split.halves(state.privacy_state)
        for index, (rows, rows_mask) in enumerate(pieces(state, inputs, mask, bucket_size)):
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


def _real_rows(inputs, mask: torch.Tensor):
    """A batch's real rows and their mask (all true), the batch itself where every row is real;
    without any, its row 0 masked out, whose contribution is exactly zero, so that the engine
    still sees a batch."""
    index = torch.nonzero(mask).flatten()
    if index.numel() == mask.shape[0]:
        return inputs, mask
    if index.numel() == 0:
        return tuple(x[:1] for x in inputs), mask[:1]
    return tuple(x[index.to(x.device)] for x in inputs), mask[index]


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

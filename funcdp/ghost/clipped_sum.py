"""`ghost_clipped_sum`: the clipped sum of per-example gradients without materialising them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from funcdp._certify import matmul_roundoff, norms_upper, squares_upper, with_margin
from funcdp._checks import check_mask, check_positive
from funcdp._rules import flat_factors
from funcdp.ghost import capture, matmul, rows, rules, tapped, tied
from funcdp.memory import ChunkSize, check_chunk_option, examples_in_budget, is_auto
from funcdp.tree import all_finite, upcast_half, zero_rows

LossFn = Callable[..., Any]
FactorFn = Callable[[torch.Tensor], torch.Tensor]


class GhostResult(NamedTuple):
    """What `ghost_clipped_sum` returns.

    Attributes:
      grads: sum over real examples of the clipped gradients, keyed like `params`.
      norms: [B], each example's full gradient norm (over all groups); 0 on padded rows.
      group_norms: [B, G], the norm of each example's gradient in each group (G = 1 when
        clipping is flat); 0 on padded rows.
      losses: [B], each example's loss, as computed (padded rows may hold anything).
      clipped: [B] bool, the real examples the rule scaled down (some group's factor below 1).
    """

    grads: dict[str, torch.Tensor]
    norms: torch.Tensor
    group_norms: torch.Tensor
    losses: torch.Tensor
    clipped: torch.Tensor


def ghost_clipped_sum(
    loss_fn: LossFn,
    *,
    max_norm: float | None = None,
    factor_fn: FactorFn | None = None,
    groups: Callable[[str], str] | None = None,
    group_names: tuple[str, ...] | None = None,
    chunk_size: ChunkSize = None,
    zero_nonfinite: bool = False,
    conv_explicit: str = "vmap",
) -> Callable[..., GhostResult]:
    """Returns `fn(params, *batch, mask=None) -> GhostResult`, the clipped sum by ghost clipping.

    Computes the same sum_i c_i g_i as `funcdp.clipped_sum(mode="vmap")` (or `clip_by` followed by
    `aggregate`) from ONE batched forward and backward, without forming the per-example
    gradients of linear (and `torch.addmm`, HF's Conv1D), conv, embedding and normalization
    parameters: their per-example norms come from each op's input A and output gradient B
    (ghost norms, Li et al. 2022), and their clipped sum from one more contraction of A with
    c * B (book-keeping, Bu et al. 2023); an embedding tied to its output layer sums its two
    uses with a certified cross term (`funcdp.ghost.tied`). Parameters used anywhere else
    (recurrent weights, other shared weights, a parameter read by the loss itself) get
    per-example gradients by `vmap(grad)` over just them, in the same pass (an example whose
    linear terms there cancel is computed again alone, `funcdp.ghost.rows`). See
    `funcdp.ghost.capture` for how ops are found without hooks, and `funcdp.explain` for
    which parameters take which path.

    The batched forward is `vmap` of `loss_fn` over the examples: the one-example loss of the
    train step serves as is, and `vmap` gives each op's per-example input and output gradient.

    Args:
      loss_fn: `loss_fn(params, *example)`, the scalar loss of ONE example; `params` is a dict
        of tensors keyed by name, handed on unchanged to the model (e.g. `functional_call`).
      max_norm: flat clipping at C: c_i = min(1, C / ||g_i||). Exclusive with `factor_fn`.
      factor_fn: the factor rule, from norms [B, G] to factors [B, G] as in `clip_by` (G = 1
        without `groups`); each parameter is scaled by its group's factor.
      groups: maps a parameter's name to its group's name (per-layer clipping: `lambda n: n`).
      group_names: the groups' names in column order; default the sorted names of `groups`.
      chunk_size: vmap at most this many examples at once. "auto" (or an `AutoChunk`) sizes
        the chunks of the fallback parameters' per-example gradients from a memory budget,
        measured once per batch signature (`funcdp.memory`); with no fallback parameters
        nothing per-example is formed and the batch goes through in one piece.
      zero_nonfinite: a real example whose loss or gradient norm is not finite contributes
        zero instead of poisoning the sum (its reported norm stays non-finite, so a caller can
        count it); the rows are selected away and the shares recomputed, which costs a second
        book-keeping pass on such (rare) batches. Without it, the sum is not finite either.
      conv_explicit: where a conv weight's explicit per-example gradient is cheaper than
        ghost clipping (T (p + d) >= p d), "vmap" forms it by vmap's batched conv backward (the
        default, faster on CPU), "unfold" by im2col and a batched matmul.

    Returns:
      `fn(params, *batch, mask=None)`; `params` is a dict of tensors, every `batch` tensor has
      the leading dimension B, `mask` (bool [B]) marks the real rows. Padded rows contribute
      exactly zero, whatever they hold (NaN included).

    Raises:
      ValueError: neither or both of max_norm and factor_fn, max_norm <= 0, max_norm with
        groups, a bad chunk_size (when built); a parameter in no listed group, or factors of
        the wrong shape (when called).
    """
    if (max_norm is None) == (factor_fn is None):
        raise ValueError("ghost_clipped_sum takes exactly one of max_norm and factor_fn")
    if max_norm is not None:
        check_positive("max_norm", max_norm)
        if groups is not None:
            raise ValueError("max_norm is flat clipping; pass factor_fn for grouped clipping")
        limit = float(max_norm)
        factor_fn = flat_factors(limit)
    if conv_explicit not in ("vmap", "unfold"):
        raise ValueError(f'conv_explicit must be "vmap" or "unfold", got {conv_explicit!r}')
    check_chunk_option(chunk_size)
    plans: dict[tuple, capture.Plan] = {}  # by parameter and example signature
    chunks: dict[tuple, int | None] = {}  # chunk_size="auto": examples in budget, by that too

    def plan_for(params, batch) -> tuple[capture.Plan, int | None]:
        """The probe's plan, run once per signature (the tapper checks each pass against
        it), and the vmap chunk."""
        key = capture.signature(params, batch)
        if key not in plans:
            plans[key] = capture.plan(loss_fn, params, batch, conv_explicit=conv_explicit)
        if not is_auto(chunk_size):
            return plans[key], chunk_size
        if key not in chunks:
            chunks[key] = _auto_chunk(chunk_size, loss_fn, params, plans[key], batch)
        chunk = chunks[key]
        return plans[key], None if chunk is None else min(chunk, batch[0].shape[0])

    def fn(params: Mapping[str, torch.Tensor], *batch: Any, mask=None) -> GhostResult:
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of tensors, got {type(params).__name__}")
        if not batch:
            raise ValueError("ghost_clipped_sum needs at least one batched argument")
        if batch[0].dim() == 0 or batch[0].shape[0] == 0:
            raise ValueError(
                "ghost_clipped_sum needs a batch of at least one row (pad an empty batch with "
                f"mask false), got batch[0] of shape {tuple(batch[0].shape)}"
            )
        names = _group_names(params, groups, group_names)
        column = {name: names.index(groups(name)) if groups else 0 for name in params}
        keep = _keep(mask, batch[0].shape[0], batch[0].device)
        plan, chunk = plan_for(params, batch)
        passed = tapped.one_pass(loss_fn, params, plan, batch, chunk)
        passed, known = rows.settle(loss_fn, params, plan, batch, passed, keep)
        # Each example's norm reads its own rows only, so padded rows are left in; in the sums
        # their factor 0 zeroes them exactly unless they hold inf or NaN (see below). A compiled
        # graph takes no data-dependent branch: it selects padded rows away from the start.
        compiling = torch.compiler.is_compiling()
        squares, books = _shares(params, plan, keep if compiling else None, passed, keep, known)
        grouped = _grouped_squares(squares, column, len(names), keep)
        real, clean, masked = keep, grouped, compiling
        if zero_nonfinite:
            finite = torch.isfinite(grouped.sum(1)) & torch.isfinite(passed.losses)
            if compiling or not bool((finite | ~keep).all()):  # select the bad rows away
                real, masked = keep & finite, True
                squares, books = _shares(params, plan, real, passed, real)
                clean = _grouped_squares(squares, column, len(names), real)
        terms, tensors = len(squares), tuple(params.values())
        group_norms = norms_upper(grouped, terms, tensors)
        zero = torch.zeros((), dtype=group_norms.dtype, device=keep.device)
        clean_norms = group_norms if clean is grouped else norms_upper(clean, terms, tensors)
        factors = _factors(factor_fn, torch.where(real[:, None], clean_norms, zero))
        factors = torch.where(real[:, None], factors, zero)
        summed = {name: books[name](factors[:, column[name]]) for name in params}
        if not masked and not all_finite(summed.values()) and not bool(keep.all()):
            # 0 * inf is NaN: a padded row held a non-finite value. Select it away and redo.
            _, books = _shares(params, plan, real, passed, real)
            summed = {name: books[name](factors[:, column[name]]) for name in params}
        return GhostResult(
            grads=summed,
            norms=torch.where(keep, norms_upper(grouped.sum(1), terms, tensors), zero),
            group_norms=torch.where(keep[:, None], group_norms, zero),
            losses=passed.losses,
            clipped=(factors < 1).any(1) & real,
        )

    return fn


def _auto_chunk(spec, loss_fn, params, plan, batch) -> int | None:
    """How many examples' fallback gradients and activations fit the budget of `spec`; None
    (one piece) when there are no fallback parameters: nothing per-example is formed."""
    if not plan.fallback:
        return None
    fallback = {name: params[name] for name in plan.fallback}

    def fallback_loss(own, *example):
        return loss_fn({**params, **own}, *example)

    return examples_in_budget(fallback_loss, fallback, *batch, spec=spec)


def _shares(params, plan, keep, passed: tapped.Pass, real, known=None):
    """Squared per-example norms (float64 upper bounds) and clipped-sum builders for every
    parameter; `keep` zeroes padded rows first (None: leave them), `real` marks the rows that
    may take the rules' exact path; `known` holds fallback gradients' squares already read
    (`rows.settle`), of rows left as they are."""
    shapes = {name: p.shape for name, p in params.items()}
    squares, books, uses, found = {}, {}, {}, []
    tied_names = frozenset(name for name, used in plan.uses.items() if capture.tied(used))
    budget = matmul.Budget(fixed_layout=tied_names)
    for spec, a, g in zip(plan.ops, passed.inputs, passed.taps, strict=True):
        if spec.weight is None and spec.bias is None:  # checked only (`rows`)
            continue
        a, g = _zero_padded(upcast_half(a), keep), _zero_padded(upcast_half(g), keep)
        found += [(spec, a, g, piece) for piece in rules.pieces(spec, a, g, shapes, real, budget)]
    # The Gram-form weights' bounds, those of one shape computed together.
    certified = iter(matmul.certify([f[3] for f in found if isinstance(f[3], matmul.Pending)]))
    # The formed weights' amplified examples, read at once and formed again alone.
    formed = [f[3] for f in found if isinstance(f[3], matmul.Unsettled)]
    settled = iter(matmul.settle(formed, real))
    for spec, a, g, piece in found:
        if isinstance(piece, matmul.Pending):
            piece = next(certified)
        elif isinstance(piece, matmul.Unsettled):
            piece = next(settled)
        uses.setdefault(piece.name, []).append((spec, a, g, piece))
    for name, entries in uses.items():  # a tied parameter has one entry per use
        piece = entries[0][3] if len(entries) == 1 else tied.combine(name, entries)
        squares[name], books[name] = piece.squared_norms, piece.book
    for name, per_example in passed.fallback.items():
        flat = _zero_padded(upcast_half(per_example), keep).flatten(1)
        reusable = keep is None and name in (known or {})
        squares[name] = known[name] if reusable else squares_upper(flat)
        books[name] = lambda c, flat=flat, shape=shapes[name]: (c.to(flat.dtype) @ flat).reshape(
            shape
        )
    return squares, books


def _grouped_squares(squares, column, count: int, keep) -> torch.Tensor:
    """Squared norms [B, G] of each example's gradient in each group: float64 sums of upper
    bounds (`norms_upper` adds the sums' own rounding), in a few ops whatever the number of
    parameters (on a GPU each op is a launch)."""
    members: list[list[torch.Tensor]] = [[] for _ in range(count)]
    for name, squared in squares.items():
        members[column[name]].append(squared)
    empty = torch.zeros(keep.shape[0], dtype=torch.float64, device=keep.device)
    sums = [torch.stack(group, dim=1).sum(1) if group else empty for group in members]
    return torch.stack(sums, dim=1)


def _zero_padded(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x with the rows of padded examples replaced by zeros; x itself when `keep` is None."""
    return x if keep is None else zero_rows(x, keep)


def _keep(mask, size: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(size, dtype=torch.bool, device=device)
    check_mask(mask, size)
    return mask.to(device)


def _group_names(params, groups, group_names) -> list[str]:
    if groups is None:
        return ["all"]
    names = list(group_names) if group_names is not None else sorted({groups(n) for n in params})
    for name in params:
        if groups(name) not in names:
            raise ValueError(
                f"parameter {name!r} is in group {groups(name)!r}, which is not one of {names}"
            )
    return names


def _factors(factor_fn, group_norms: torch.Tensor) -> torch.Tensor:
    factors = factor_fn(group_norms)
    expected = tuple(group_norms.shape)
    if not isinstance(factors, torch.Tensor) or tuple(factors.shape) != expected:
        raise ValueError(
            f"factor_fn must return a tensor of shape {expected}, "
            f"got {getattr(factors, 'shape', type(factors).__name__)}"
        )
    factors = factors.to(group_norms.dtype)
    # The book-keeping applies them in matrix products: TF32 or bf16 ones round more.
    return with_margin(factors, matmul_roundoff(group_norms.dtype, group_norms.device))

"""Linear and conv parameters: per example g = G^T A over positions T, taken as Gram norms or formed.

The norm is <A A^T, G G^T> (ghost norm, cost O(T^2 (d + p)) and then the book's O(T p d)), or the
explicit [B, p, d] gradient is formed (O(T p d)) and both its norm and its share of the sum are
read from it (Li et al. 2022, Bu et al. 2023). `matmul_form` chooses: formed where it is no
larger than the Grams (2 T^2 >= p d), or, where the pass's formed gradients fit
`bounds.EXPLICIT_ELEMENTS` (a `Budget`), on long sequences (`bounds.LONG_SEQUENCE`), where it is
faster than the Grams and their book-keeping (p d < 4 T (p + d), `bounds.FORMING_RATIO`), or where
the Grams are too wide to certify in float32 (`bounds.WIDE_GRAMS`: a language model's output
layer). The Gram form's error is bounded a priori
(`funcdp.ghost.rules`, "Certified norms"); an example whose bound is too loose is formed apart.
The bounds of a pass's Gram-form weights are computed by `certify`, those whose Grams have one
shape together (a transformer's weights): on a GPU that arithmetic is a launch per elementwise op.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from funcdp._certify import gamma, matmul_roundoff, sqrt_upper, squares_upper, unit_roundoff
from funcdp.ghost import bounds
from funcdp.ghost.bounds import (
    SMALL_GRAMS,
    certified,
    diagonal_norms,
    inner_rows,
    per_block,
    quadratic,
    underflow,
)
from funcdp.ghost.pieces import Piece, explicit_piece
from funcdp.tree import zero_rows

_U64 = 2.0**-53


class Budget:
    """What one ghost pass may still form, in elements of per-example gradients over the batch,
    where forming is faster than Grams but takes more memory (`bounds.EXPLICIT_ELEMENTS`): the
    formed gradients of all ops are held until the clip factors are known. `fixed_layout` names
    the weights whose formed gradient must keep the weight's [p, d] layout (a tied weight, whose
    embedding rows are added into it, `funcdp.ghost.tied`)."""

    def __init__(self, elements: int | None = None, fixed_layout: frozenset[str] = frozenset()):
        self.left = bounds.EXPLICIT_ELEMENTS if elements is None else elements
        self.fixed_layout = fixed_layout

    def choose(self, count: int, positions: int, p: int, d: int) -> str:
        """`matmul_form` within what is left, which a gradient formed for speed then uses."""
        form = matmul_form(count, positions, p, d, self.left)
        if form not in (GRAM, SMALLER):
            self.left -= count * p * d
        return form


class Pending(NamedTuple):
    """A weight in the Gram form, its bound not yet computed: `certify` computes those of one
    pass together. `transposed`: its clipped sum is the transpose of the book's (addmm)."""

    name: str
    a: torch.Tensor
    g: torch.Tensor
    shape: tuple[int, ...]
    real: torch.Tensor
    transposed: bool = False


class Unsettled(NamedTuple):
    """A weight whose per-example gradients are formed, before `settle` (which reads a pass's
    weights at once) forms its amplified examples' gradients again, each alone.
    `transposed`: as for `Pending`. `wide_last`: formed as A^T G, [d, p] (`_formed`)."""

    name: str
    a: torch.Tensor
    g: torch.Tensor
    explicit: torch.Tensor  # [B, groups * p * d]
    squared: torch.Tensor  # [B], upper bounds of its rows' squared norms
    reach: torch.Tensor  # [B], the size of its terms: sum over positions of |A_t| |G_t|
    shape: tuple[int, ...]
    transposed: bool = False
    wide_last: bool = False


def matmul_piece(
    name: str, a: torch.Tensor, g: torch.Tensor, shape, real, budget
) -> Piece | Pending | Unsettled:
    """g_i = sum_t G[i, t]^T A[i, t] per group; a: [B, T, groups, d], g: [B, T, groups, p].
    A Piece where the gradient is an outer product; formed, an `Unsettled`; in the Gram form a
    `Pending`."""
    size, positions, groups, d = a.shape
    p = g.shape[-1]
    if positions == 1:  # one position: the gradient is an outer product, ||g||^2 ||a||^2
        squared = (squares_upper(a) * squares_upper(g)).sum((1, 2)) * (1.0 + 4.0 * _U64)
        return Piece(name, squared, _book(a, g, shape, p, d, groups, None))
    if budget.choose(size * groups, positions, p, d) != GRAM:
        wide_last = p > d and groups == 1 and len(shape) == 2 and name not in budget.fixed_layout
        explicit = _formed(_rows(a), _rows(g), wide_last).reshape(size, -1)
        reach = (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(g, dim=-1)).sum(1)
        if groups > 1:  # the groups' terms make one vector per example
            reach = torch.linalg.vector_norm(reach, dim=1)
        squared = squares_upper(explicit)
        layout = (d, p) if wide_last else shape
        return Unsettled(name, a, g, explicit, squared, reach.flatten(), layout, False, wide_last)
    return Pending(name, a, g, tuple(shape), real)


def _formed(a: torch.Tensor, g: torch.Tensor, wide_last: bool) -> torch.Tensor:
    """The per-example products of a [N, T, d] and g [N, T, p]: G^T A, [N, p, d], or with
    `wide_last` A^T G, [N, d, p]. A batched product runs faster with the wider side last (13%
    on this CPU for a transformer's feed-forward weights, p = 4 d)."""
    if wide_last:
        return torch.bmm(a.transpose(1, 2), g)
    return torch.bmm(g.transpose(1, 2), a)


def settle(unsettled: list[Unsettled], real: torch.Tensor) -> list[Piece]:
    """The pieces of one pass's formed weights, in order, with their amplified examples'
    gradients (of the `real` rows) formed again, each alone; one device read for them all.

    A batched product can round an example's gradient differently by its row (this CPU's
    batched matmul does, for some shapes), and an example's row depends on which examples were
    sampled before it. That moves its gradient by at most gamma_T times its terms, a small part
    of the gradient where the terms are at most AMPLIFICATION times its norm. Terms crafted to
    cancel leave a gradient that may be mostly rounding: such an example is formed alone, by
    the same call whatever its row. A compiled graph takes no data-dependent branch: there its
    share of the weight is zero."""
    if not unsettled:
        return []
    # Real rows whose terms exceed AMPLIFICATION times their gradient's norm, [K, B].
    reach = torch.stack([u.reach.to(u.squared.dtype) for u in unsettled])
    squared = torch.stack([u.squared for u in unsettled])
    amplified = real & ~(reach <= bounds.AMPLIFICATION * squared.sqrt())
    compiling = torch.compiler.is_compiling()
    redo = [True] * len(unsettled) if compiling else amplified.any(1).tolist()
    pieces = []
    for u, rows, any_amplified in zip(unsettled, amplified, redo, strict=True):
        explicit, squares = u.explicit, u.squared
        if compiling:
            explicit, squares = zero_rows(explicit, ~rows), zero_rows(squares, ~rows)
        elif any_amplified:
            for i in torch.nonzero(rows).flatten().tolist():
                explicit[i] = _formed_alone(u.a[i], u.g[i], u.wide_last).flatten()
            squares = squares_upper(explicit)
        piece = explicit_piece(u.name, explicit, u.shape, squares)
        pieces.append(transposed(piece) if u.transposed != u.wide_last else piece)
    return pieces


def _formed_alone(a: torch.Tensor, g: torch.Tensor, wide_last: bool = False) -> torch.Tensor:
    """One example's gradient [groups, p, d] (with `wide_last` [groups, d, p], as `_formed`)
    from its a [T, groups, d] and g [T, groups, p], by one product on fresh copies: the same
    call, and so the same rounding, whatever the example's row in the batch and however many
    others are formed."""
    fresh = [x.transpose(0, 1).clone(memory_format=torch.contiguous_format) for x in (a, g)]
    return _formed(*fresh, wide_last)  # [groups, T, d] and [groups, T, p]


def certify(pending: list[Pending]) -> list[Piece]:
    """The pieces of Gram-form weights, in order. Weights whose Grams have one shape and dtype
    (batch, positions, groups; their widths d and p may differ: a transformer's layers and its
    attention and feed-forward weights) share one run of the bound arithmetic over their stacked
    Grams (up to `STACKED_GRAM_ELEMENTS` per Gram stack), about 50 elementwise launches (on a
    GPU, each a launch) whatever their number, with the widths' error constants per row; the
    Grams are computed into one buffer, so stacking them copies nothing."""
    kinds: dict[tuple, list[int]] = {}
    for i, job in enumerate(pending):
        key = (job.a.shape[:3], _gram_dtype(job), job.a.dtype, job.g.dtype, job.a.device)
        kinds.setdefault(key, []).append(i)
    pieces: list[Piece | None] = [None] * len(pending)
    for indices in kinds.values():
        size, positions, groups, _ = pending[indices[0]].a.shape
        per_stack = max(1, STACKED_GRAM_ELEMENTS // (size * groups * positions**2))
        for start in range(0, len(indices), per_stack):
            chosen = indices[start : start + per_stack]
            certified = _certify_alike([pending[i] for i in chosen])
            for i, piece in zip(chosen, certified, strict=True):
                pieces[i] = piece
    return pieces


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, groups, n] -> [B * groups, T, n]: each example's and group's positions."""
    size, positions, groups, n = x.shape
    return x.transpose(1, 2).reshape(size * groups, positions, n)


def _gram_dtype(job: Pending) -> torch.dtype:
    """float64 for small Grams (cheap, and their bound nearly vanishes), else the working dtype."""
    size, positions, groups, d = job.a.shape
    if size * groups * positions**2 * (d + job.g.shape[-1]) <= SMALL_GRAMS:
        return torch.float64
    return torch.promote_types(job.a.dtype, job.g.dtype)


def _certify_alike(jobs: list[Pending]) -> list[Piece]:
    """`certify` for weights whose Grams have one shape and dtype: stacked as one batch of
    K * B rows. The error constants that depend on a weight's widths d and p are per row
    (`bounds.per_block`), and plain numbers where the widths agree, as for one weight alone."""
    size, positions, groups, _ = jobs[0].a.shape
    count, dtype = len(jobs), _gram_dtype(jobs[0])
    widths_a, widths_g = [job.a.shape[-1] for job in jobs], [job.g.shape[-1] for job in jobs]
    rows = size * groups
    grams = torch.empty(2, count * rows, positions, positions, dtype=dtype, device=jobs[0].a.device)
    for k, job in enumerate(jobs):
        for gram, x in zip(grams, (job.a, job.g), strict=True):
            x = _rows(x).to(dtype)
            torch.bmm(x, x.transpose(1, 2), out=gram[k * rows : (k + 1) * rows])
    gram_a, gram_g = grams
    total = count * size  # the stacked examples
    estimate = inner_rows(gram_a, gram_g).reshape(total, -1).sum(1)
    v = matmul_roundoff(gram_a.dtype, gram_a.device)
    na = diagonal_norms(gram_a, widths_a, v)  # [K * B * groups, T]
    ng = diagonal_norms(gram_g, widths_g, v)
    # reach: sum over positions of |A_t| |G_t|, the size of the terms that can cancel
    reach = (na * ng).sum(1).double()
    if groups > 1:  # the groups' terms make one vector per example
        reach = reach.reshape(total, groups).square().sum(1).sqrt()
    reach = reach * (1.0 + 2.0 * gamma(positions + 3, unit_roundoff(na.dtype)))
    # |error of a Gram entry| <= gamma_d |A_t| |A_s| (gamma_p for G); each row of the estimate
    # adds gamma_(T+1) sum_s |Ga_ts Gg_ts| <= gamma_(T+1) (1 + gamma_d) na^T |Gg| na, and
    # what underflows; then the float64 sum of the rows
    row = gamma(positions + 1, unit_roundoff(gram_a.dtype))
    quad_a, quad_g = quadratic(na, gram_g.abs()), quadratic(ng, gram_a.abs())  # float64 [K B G]
    error_a = quad_a * per_block(
        [gamma(d, v) + (1.0 + gamma(d, v)) * row for d in widths_a], quad_a
    )
    gamma_g = per_block([gamma(p, v) for p in widths_g], quad_g)
    error = (
        torch.add(error_a, quad_g, alpha=gamma_g)
        if isinstance(gamma_g, float)
        else torch.addcmul(error_a, quad_g, gamma_g)  # the same products and sums, per row
    )
    tail = gamma(groups * positions**2 + 1, _U64)
    cross = per_block(
        [
            2.0 * (3.0 * gamma(d, v) * gamma(p, v) + tail)
            for d, p in zip(widths_a, widths_g, strict=True)
        ],
        reach,
    )
    summed = error.reshape(total, groups).sum(1)
    error = (
        torch.addcmul(summed, reach, reach, value=cross)
        if isinstance(cross, float)
        else torch.addcmul(summed, reach * cross, reach)
    )
    error = error + underflow(groups * positions**2, gram_a.dtype)
    # the book-keeping product's rounding, at the precision torch runs it with
    u = matmul_roundoff(jobs[0].a.dtype, jobs[0].a.device)
    bound, exact, rounding = certified(estimate, error, reach, positions, u)
    real = torch.cat([job.real for job in jobs])
    flagged = bounds.flagged(bound, estimate, real, reach)
    # One device read for the group; a compiled graph takes no data-dependent branch.
    forming = not torch.compiler.is_compiling() and bool(flagged.any())
    slices = [slice(k * size, (k + 1) * size) for k in range(count)]
    return [
        _piece(job, bound[r], exact[r], rounding[r], reach[r], flagged[r] if forming else None)
        for job, r in zip(jobs, slices, strict=True)
    ]


def _piece(job: Pending, bound, exact, rounding, reach, flagged) -> Piece:
    """A certified weight's piece; `flagged` (None: none) examples' gradients formed apart."""
    formed = None if flagged is None else _formed_matmul(job.a, job.g, flagged)
    if formed is not None:
        bound = bound.index_put((formed[0],), formed[2])
        exact = exact.index_fill(0, formed[0], float("inf"))
    squared = bound.square() * (1.0 + 2.0 * _U64)
    p, (_, _, groups, d) = job.g.shape[-1], job.a.shape
    book = _book(job.a, job.g, job.shape, p, d, groups, formed)
    piece = Piece(job.name, squared, book, exact, rounding, reach)
    return transposed(piece) if job.transposed else piece


def transposed(piece: Piece | Pending | Unsettled) -> Piece | Pending | Unsettled:
    """`piece` with its clipped sum transposed (addmm's weight is [d, p], the book's [p, d]);
    a `Pending` or `Unsettled` one is transposed once `certify` or `settle` has built its book."""
    if isinstance(piece, (Pending, Unsettled)):
        return piece._replace(transposed=True)
    return piece._replace(book=lambda factors, book=piece.book: book(factors).T)


GRAM = "Gram form"
# At most this many Gram entries (per Gram of a weight, over its examples) are stacked for one
# run of the bound arithmetic, whose temporaries are a few times the stack (16 MiB in float32).
STACKED_GRAM_ELEMENTS = 1 << 22
SMALLER = "formed: no larger than its Gram matrices"


def matmul_form(count: int, positions: int, p: int, d: int, left: int | None = None) -> str:
    """How ghost clipping takes `count` per-example [p, d] gradients over `positions`: GRAM,
    or why it forms them instead: no larger than their Gram matrices (SMALLER); or, within the
    `left` elements its pass may still form, a long sequence, a cheaper pass than the Gram form
    and its book-keeping, or Grams too wide to certify in float32 (every example would be
    formed after them anyway); `left` defaults to `bounds.EXPLICIT_ELEMENTS`."""
    if 2 * positions * positions >= p * d:
        return SMALLER
    if count * p * d > (bounds.EXPLICIT_ELEMENTS if left is None else left):
        return GRAM
    if positions >= bounds.LONG_SEQUENCE:
        return "formed: a long sequence, where the Gram form costs more"
    if p * d < bounds.FORMING_RATIO * positions * (p + d):
        return "formed: cheaper than its Gram form and book-keeping"
    if p + d >= bounds.WIDE_GRAMS and count * positions**2 * (d + p) > SMALL_GRAMS:
        return "formed: too wide to certify its Gram matrices in float32"
    return GRAM


def _formed_matmul(a, g, flagged):
    """The flagged examples' gradients, formed: (indices, [F, groups, p, d], norm bounds [F]).

    The formed gradient is what these examples add to the sum, so its own (certified) norm
    bounds their share; None when no example is flagged."""
    if not bool(flagged.any()):
        return None
    index = torch.nonzero(flagged).flatten()
    # Each alone: a product over the F flagged examples rounds by F and by row (`settle`).
    explicit = torch.stack([_formed_alone(a[i], g[i]) for i in index.tolist()])
    return index, explicit, sqrt_upper(squares_upper(explicit.flatten(1)))


def _book(a, g, shape, p: int, d: int, groups: int, formed):
    """sum_i c_i G_i^T A_i in float32 (the flagged examples' formed gradients added apart)."""

    def book(factors):
        kept = factors if formed is None else factors.index_fill(0, formed[0], 0.0)
        # Scale the smaller of G and A by the factors.
        column = kept.to(g.dtype)[:, None, None, None]
        left, right = (g * column, a) if p <= d else (g, a * column)
        if groups == 1:
            total = (left.reshape(-1, p).T @ right.reshape(-1, d)).reshape(shape)
        else:
            total = torch.einsum("nkp,nkd->kpd", left.flatten(0, 1), right.flatten(0, 1))
            total = total.reshape(shape)
        if formed is None:
            return total
        index, gradients, _ = formed
        scaled = (factors[index].to(gradients.dtype)[:, None, None, None] * gradients).sum(0)
        return total + scaled.reshape(shape)

    return book

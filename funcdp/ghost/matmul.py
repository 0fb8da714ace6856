"""Linear and conv parameters: per example g = G^T A over positions T, taken as Gram norms or formed.

The norm is <A A^T, G G^T> (ghost norm, cost O(T^2 (d + p)) and then the book's O(T p d)), or the
explicit [B, p, d] gradient is formed (O(T p d)) and both its norm and its share of the sum are
read from it (Li et al. 2022, Bu et al. 2023). `matmul_form` chooses: formed where it is no
larger than the Grams (2 T^2 >= p d), or, where the pass's formed gradients fit
`bounds.EXPLICIT_ELEMENTS` (a `Budget`), on long sequences (`bounds.LONG_SEQUENCE`), where it takes
fewer operations (p d < T (p + d)), or where the Grams are too wide to certify in float32
(`bounds.WIDE_GRAMS`: a language model's output layer). The Gram form's error is bounded a priori
(`funcdp.ghost.rules`, "Certified norms"); an example whose bound is too loose is formed apart.
"""

from __future__ import annotations

import torch

from funcdp._certify import gamma, matmul_roundoff, sqrt_upper, squares_upper, unit_roundoff
from funcdp.ghost import bounds
from funcdp.ghost.bounds import (
    SMALL_GRAMS,
    certified,
    diagonal_norms,
    inner_rows,
    quadratic,
    underflow,
)
from funcdp.ghost.pieces import Piece, explicit_piece

_U64 = 2.0**-53


class Budget:
    """What one ghost pass may still form, in elements of per-example gradients over the batch,
    where forming is faster than Grams but takes more memory (`bounds.EXPLICIT_ELEMENTS`): the
    formed gradients of all ops are held until the clip factors are known."""

    def __init__(self, elements: int | None = None):
        self.left = bounds.EXPLICIT_ELEMENTS if elements is None else elements

    def choose(self, count: int, positions: int, p: int, d: int) -> str:
        """`matmul_form` within what is left, which a gradient formed for speed then uses."""
        form = matmul_form(count, positions, p, d, self.left)
        if form not in (GRAM, SMALLER):
            self.left -= count * p * d
        return form


def matmul_piece(name: str, a: torch.Tensor, g: torch.Tensor, shape, real, budget) -> Piece:
    """g_i = sum_t G[i, t]^T A[i, t] per group; a: [B, T, groups, d], g: [B, T, groups, p]."""
    size, positions, groups, d = a.shape
    p = g.shape[-1]
    if positions == 1:  # one position: the gradient is an outer product, ||g||^2 ||a||^2
        squared = (squares_upper(a) * squares_upper(g)).sum((1, 2)) * (1.0 + 4.0 * _U64)
        return Piece(name, squared, _book(a, g, shape, p, d, groups, None))
    a_rows = a.transpose(1, 2).reshape(size * groups, positions, d)
    g_rows = g.transpose(1, 2).reshape(size * groups, positions, p)
    if budget.choose(size * groups, positions, p, d) != GRAM:
        explicit = torch.bmm(g_rows.transpose(1, 2), a_rows)  # [B * groups, p, d]
        return explicit_piece(name, explicit.reshape(size, -1), shape)
    if size * groups * positions**2 * (d + p) <= SMALL_GRAMS:  # cheap in float64: near exact
        a_rows, g_rows = a_rows.double(), g_rows.double()
    gram_a = torch.bmm(a_rows, a_rows.transpose(1, 2))
    gram_g = torch.bmm(g_rows, g_rows.transpose(1, 2))
    estimate = inner_rows(gram_a, gram_g).reshape(size, -1).sum(1)
    v = matmul_roundoff(gram_a.dtype, gram_a.device)
    na, ng = diagonal_norms(gram_a, d, v), diagonal_norms(gram_g, p, v)  # [B * groups, T]
    # reach: sum over positions of |A_t| |G_t|, the size of the terms that can cancel
    reach = (na * ng).sum(1).double()
    if groups > 1:  # the groups' terms make one vector per example
        reach = reach.reshape(size, groups).square().sum(1).sqrt()
    reach = reach * (1.0 + 2.0 * gamma(positions + 3, unit_roundoff(na.dtype)))
    # |error of a Gram entry| <= gamma_d |A_t| |A_s| (gamma_p for G); each row of the estimate
    # adds gamma_(T+1) sum_s |Ga_ts Gg_ts| <= gamma_(T+1) (1 + gamma_d) na^T |Gg| na, and
    # what underflows; then the float64 sum of the rows
    row = gamma(positions + 1, unit_roundoff(gram_a.dtype))
    error_a = quadratic(na, gram_g.abs()) * (gamma(d, v) + (1.0 + gamma(d, v)) * row)
    error = torch.add(error_a, quadratic(ng, gram_a.abs()), alpha=gamma(p, v))
    cross = 3.0 * gamma(d, v) * gamma(p, v) + gamma(groups * positions**2 + 1, _U64)
    error = torch.addcmul(error.reshape(size, groups).sum(1), reach, reach, value=2.0 * cross)
    error = error + underflow(groups * positions**2, gram_a.dtype)
    # the book-keeping product's rounding, at the precision torch runs it with
    u = matmul_roundoff(a.dtype, a.device)
    bound, exact, rounding = certified(estimate, error, reach, positions, u)
    flagged = bounds.flagged(bound, estimate, real, reach)
    formed = None if torch.compiler.is_compiling() else _formed_matmul(a, g, flagged)
    if formed is not None:
        bound = bound.index_put((formed[0],), formed[2])
        exact = exact.index_fill(0, formed[0], float("inf"))
    squared = bound.square() * (1.0 + 2.0 * _U64)
    book = _book(a, g, shape, p, d, groups, formed)
    return Piece(name, squared, book, exact, rounding, reach)


GRAM = "Gram form"
SMALLER = "formed: no larger than its Gram matrices"


def matmul_form(count: int, positions: int, p: int, d: int, left: int | None = None) -> str:
    """How ghost clipping takes `count` per-example [p, d] gradients over `positions`: GRAM,
    or why it forms them instead: no larger than their Gram matrices (SMALLER); or, within the
    `left` elements its pass may still form, a long sequence, fewer operations, or Grams too
    wide to certify in float32 (every example would be formed after them anyway); `left`
    defaults to `bounds.EXPLICIT_ELEMENTS`."""
    if 2 * positions * positions >= p * d:
        return SMALLER
    if count * p * d > (bounds.EXPLICIT_ELEMENTS if left is None else left):
        return GRAM
    if positions >= bounds.LONG_SEQUENCE:
        return "formed: a long sequence, where the Gram form costs more"
    if p * d < positions * (p + d):
        return "formed: fewer operations than its Gram matrices"
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
    left = g[index].permute(0, 2, 3, 1).flatten(0, 1)  # [F * groups, p, T]
    right = a[index].transpose(1, 2).flatten(0, 1)  # [F * groups, T, d]
    explicit = torch.bmm(left, right).unflatten(0, (len(index), a.shape[2]))
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

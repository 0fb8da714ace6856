"""Per-example squared norms and clipped sums of one op's parameters, from its input and output grad.

For each tapped op the rules receive A, the op's input stacked over examples ([B, *input shape
of one example]), and G, the gradient of each example's loss w.r.t. the op's output ([B, *output
shape]). They return one `Piece` per ghost parameter of the op: the squared norm of each
example's gradient of that parameter, [B], and `book(c)`, the clipped sum sum_i c_i g_i formed
directly from A, G and the factors c [B] (book-keeping, Bu et al. 2023): one contraction over
examples and positions, no second backward.

- linear / conv: per example g = G^T A over positions T (conv: A unfolded, im2col), its norm
  from Gram matrices or the formed gradient, whichever `funcdp.ghost.matmul` finds cheaper.
- embedding: row v of g is the sum of G over positions holding token v, so ||g||^2 is
  sum_{t,s} [id_t = id_s] <G_t, G_s>; positions holding `padding_idx` get no gradient.
- layer_norm / group_norm: g_weight = sum over positions of G * x_hat (the normalized input),
  g_bias = sum of G; both are small, so they are formed explicitly.

Certified norms. `squared_norms` are float64 UPPER bounds on the squared norm of what each
example adds to the clipped sum per unit of its factor: the exact gradient of the float32 A and
G, plus the rounding that the example's own terms bring into the book-keeping sum. The Gram form
<A A^T, G G^T> cancels catastrophically when an example's inputs share a large common part and
its output gradients nearly cancel (a float32 estimate can then be 0, negative or NaN); its error
is bounded a priori from the per-position norms (Higham 2002, section 3.1) and, where that bound
is more than `bounds.TOLERANCE` of the estimate, the example's gradient of that op is formed (as the
vmap engine would), and the formed gradient, whose norm is read directly, is summed apart from
the book-keeping ("certify or fall back"). In a compiled step, which takes no data-dependent
branch, such an example keeps its certified bound instead: still an upper bound, only looser,
so it is clipped harder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from funcdp._certify import gamma, matmul_roundoff, sqrt_upper, squares_upper, unit_roundoff
from funcdp.ghost import bounds
from funcdp.ghost.bounds import certified, diagonal_norms, inner_rows, quadratic, underflow
from funcdp.ghost.capture import ADDMM, CONV, EMBEDDING, GROUP_NORM, LAYER_NORM, LINEAR, OpSpec
from funcdp.ghost.matmul import Budget, Pending, Unsettled, matmul_piece, transposed
from funcdp.ghost.pieces import Piece, explicit_piece

_U64 = 2.0**-53


def pieces(
    spec: OpSpec,
    inputs: torch.Tensor,
    grads: torch.Tensor,
    shapes,
    real: torch.Tensor,
    budget: Budget,
) -> list[Piece | Pending | Unsettled]:
    """The pieces of the ghost parameters of one op; a weight in the Gram form is `Pending`
    until `matmul.certify` computes its bound with the pass's others, a formed one `Unsettled`
    until `matmul.settle` has read its amplified examples with the pass's others.

    Args:
      spec: the op, as planned.
      inputs: its input, [B, *one example's input shape].
      grads: the gradient w.r.t. its output, [B, *spec.out_shape].
      shapes: parameter name -> shape.
      real: bool [B], the rows that may have their gradient formed (padded rows never do).
      budget: the pass's memory for formed gradients; a linear or conv op that forms its
        gradient for speed takes its share.
    """
    if spec.kind in (LINEAR, ADDMM, CONV):
        rule = {LINEAR: _linear, ADDMM: _addmm, CONV: _conv}[spec.kind]
        return rule(spec, inputs, grads, shapes, real, budget)
    rule = {EMBEDDING: _embedding, LAYER_NORM: _layer_norm, GROUP_NORM: _group_norm}[spec.kind]
    return rule(spec, inputs, grads, shapes, real)


def _linear(spec, inputs, grads, shapes, real, budget):
    size = grads.shape[0]
    a = inputs.reshape(size, -1, 1, inputs.shape[-1])
    g = grads.reshape(size, -1, 1, grads.shape[-1])
    if a.shape[1] == 1:  # one position (an MLP): outer products, no cancellation
        return _one_position(spec, a[:, 0, 0], g[:, 0, 0], shapes)
    out = []
    if spec.weight is not None:
        out.append(matmul_piece(spec.weight, a, g, shapes[spec.weight], real, budget))
    if spec.bias is not None:
        out.append(explicit_piece(spec.bias, g.sum(1).flatten(1), shapes[spec.bias]))
    return out


def _addmm(spec, inputs, grads, shapes, real, budget):
    """bias + x @ weight, weight [d, p]: the linear rule on weight^T (same norms), whose
    clipped sum is transposed back."""
    if spec.weight is None:
        return _linear(spec, inputs, grads, shapes, real, budget)
    shapes = {**shapes, spec.weight: tuple(reversed(shapes[spec.weight]))}
    found = _linear(spec, inputs, grads, shapes, real, budget)
    return [transposed(piece) if piece.name == spec.weight else piece for piece in found]


def _one_position(spec, a: torch.Tensor, g: torch.Tensor, shapes) -> list[Piece]:
    """A linear op at one position: per example g a^T, of squared norm |a|^2 |g|^2 (no
    cancellation), and the bias gradient g, whose squares the weight needs too."""
    a_squares, g_squares = squares_upper(a), squares_upper(g)
    out = []
    if spec.weight is not None:
        squared = a_squares * g_squares * (1.0 + 4.0 * _U64)
        out.append(Piece(spec.weight, squared, _outer_book(a, g, shapes[spec.weight])))
    if spec.bias is not None:
        out.append(explicit_piece(spec.bias, g, shapes[spec.bias], g_squares))
    return out


def _outer_book(a: torch.Tensor, g: torch.Tensor, shape):
    """sum_i c_i g_i a_i^T, scaling the smaller of g and a by the factors."""

    def book(factors):
        column = factors.to(g.dtype)[:, None]
        left, right = (g * column, a) if g.shape[1] <= a.shape[1] else (g, a * column)
        return (left.T @ right).reshape(shape)

    return book


def _conv(spec, inputs, grads, shapes, real, budget):
    config, size = spec.config, grads.shape[0]
    nd, groups = config["nd"], config["groups"]
    if inputs.dim() == nd + 2:  # unbatched conv input [C, *S] for one example
        inputs, grads = inputs.unsqueeze(1), grads.unsqueeze(1)
    g = grads.flatten(3).transpose(2, 3).reshape(size, -1, groups, grads.shape[2] // groups)
    out = []
    if spec.weight is not None:
        shape = shapes[spec.weight]
        windows = _unfold(inputs.flatten(0, 1), tuple(shape[2:]), config)
        a = windows.reshape(size, -1, groups, windows.shape[-1] // groups)
        out.append(matmul_piece(spec.weight, a, g, shape, real, budget))
    if spec.bias is not None:
        out.append(explicit_piece(spec.bias, g.sum(1).flatten(1), shapes[spec.bias]))
    return out


def _unfold(x: torch.Tensor, kernel: tuple[int, ...], config) -> torch.Tensor:
    """im2col for any nd: [N, C, *S] -> [N, L, C * prod(kernel)], C major as in the weight.

    The windows are strided views of the padded input, copied once into [N, C * K, L] (rows
    along the output positions, which copy fast) and read transposed: on this project's CPU
    that is about 7 times faster than torch's `F.unfold` (bench/RESULTS.md)."""
    nd = config["nd"]
    stride, dilation = _tuple(config["stride"], nd), _tuple(config["dilation"], nd)
    padding = config["padding"]
    if padding == "valid":
        pads = [(0, 0)] * nd
    elif padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in _tuple(padding, nd)]
    flat = [amount for pair in reversed(pads) for amount in pair]
    if any(flat):
        x = F.pad(x, flat)
    for i in range(nd):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    window = (slice(None),) * (2 + nd) + tuple(slice(None, None, d) for d in dilation)
    x = x[window]  # [N, C, *out, *kernel]
    order = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    x = x.permute(order)  # [N, C, *kernel, *out]
    return x.reshape(x.shape[0], -1, math.prod(x.shape[2 + nd :])).transpose(1, 2)


def _tuple(value, nd: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * nd


def _embedding(spec, inputs, grads, shapes, real):
    size = grads.shape[0]
    ids = inputs.reshape(size, -1)
    g = grads.reshape(size, ids.shape[1], -1)
    padding = spec.config["padding_idx"]
    if padding is not None:
        g = torch.where((ids != padding)[..., None], g, torch.zeros((), dtype=g.dtype))
    same = (ids[:, :, None] == ids[:, None, :]).to(g.dtype)
    u, positions = unit_roundoff(g.dtype), ids.shape[1]
    gram = torch.bmm(g, g.transpose(1, 2))
    estimate = inner_rows(gram, same).sum(1)
    # Each Gram entry is off by at most gamma_p |G_t| |G_s|; each row's sum adds gamma_(T+1)
    # of its terms, what underflows, and the float64 sum of the rows gamma_T.
    v, p = matmul_roundoff(g.dtype, g.device), g.shape[-1]
    norms = diagonal_norms(gram, p, v)  # [B, T], each position's output gradient
    relative = gamma(p, v) + (1.0 + gamma(p, v)) * gamma(positions + 1, u)
    relative += gamma(positions**2 + 1, _U64)
    error = relative * quadratic(norms, same) + underflow(positions**2, gram.dtype)
    reach = norms.sum(1).double() * (1.0 + 2.0 * gamma(positions + 1, u))
    bound, exact, rounding = certified(estimate, error, reach, positions, u)
    shape = shapes[spec.weight]
    flagged = bounds.flagged(bound, estimate, real, reach)
    formed = None if torch.compiler.is_compiling() else _FormedRows(ids, g, flagged, padding)

    def book(factors):
        kept = factors if formed is None else torch.where(flagged, 0.0, factors)
        rows = (g * kept.to(g.dtype)[:, None, None]).reshape(-1, g.shape[-1])
        total = g.new_zeros(shape).index_add(0, ids.reshape(-1), rows)
        return total if formed is None else formed.add_to(total, factors)

    squared = bound.square() * (1.0 + 2.0 * _U64) if formed is None else formed.squared(bound)
    if formed is not None:
        exact = exact.masked_fill(flagged, float("inf"))
    return [Piece(spec.weight, squared, book, exact, rounding, reach)]


class _FormedRows:
    """The embedding gradients of the flagged examples, formed: one row per distinct token of
    the example; the formed rows are what these examples add to the sum."""

    def __init__(self, ids, g, flagged, padding):
        self.rows = []
        chosen = torch.nonzero(flagged).flatten().tolist() if bool(flagged.any()) else []
        for i in chosen:
            keep = (
                ids[i] != padding
                if padding is not None
                else torch.ones_like(ids[i], dtype=torch.bool)
            )
            tokens, inverse = ids[i][keep].unique(return_inverse=True)
            rows = g.new_zeros(len(tokens), g.shape[-1]).index_add(0, inverse, g[i][keep])
            self.rows.append((i, tokens, rows))

    def squared(self, bound: torch.Tensor) -> torch.Tensor:
        bound = bound.clone()
        for i, _, rows in self.rows:
            bound[i] = sqrt_upper(squares_upper(rows.reshape(1, -1)))[0]
        return bound.square() * (1.0 + 2.0 * _U64)

    def add_to(self, total: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        for i, tokens, rows in self.rows:
            total = total.index_add(0, tokens, factors[i].to(rows.dtype) * rows)
        return total


def _layer_norm(spec, inputs, grads, shapes, real):
    normalized = spec.config["normalized_shape"]
    x_hat = F.layer_norm(inputs, normalized, eps=spec.config["eps"])
    positions = tuple(range(1, inputs.dim() - len(normalized)))
    return _affine(spec, x_hat, grads, positions, shapes)


def _group_norm(spec, inputs, grads, shapes, real):
    flat = inputs.flatten(0, 1)  # [B * n, C, *S]: each row is normalized on its own
    x_hat = F.group_norm(flat, spec.config["num_groups"], eps=spec.config["eps"])
    x_hat = x_hat.reshape(inputs.shape)
    positions = (1, *range(3, inputs.dim()))  # all but the example and the channel
    return _affine(spec, x_hat, grads, positions, shapes)


def _affine(spec, x_hat, grads, positions, shapes):
    out = []
    if spec.weight is not None:
        weight = (grads * x_hat).sum(positions) if positions else grads * x_hat
        out.append(explicit_piece(spec.weight, weight, shapes[spec.weight]))
    if spec.bias is not None:
        bias = grads.sum(positions) if positions else grads
        out.append(explicit_piece(spec.bias, bias, shapes[spec.bias]))
    return out

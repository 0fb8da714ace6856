"""Per-example squared norms and clipped sums of one op's parameters, from its input and output grad.

For each tapped op the rules receive A, the op's input stacked over examples ([B, *input shape
of one example]), and G, the gradient of each example's loss w.r.t. the op's output ([B, *output
shape]). They return one `Piece` per ghost parameter of the op: the squared norm of each
example's gradient of that parameter, [B], and `book(c)`, the clipped sum sum_i c_i g_i formed
directly from A, G and the factors c [B] (book-keeping, Bu et al. 2023): one contraction over
examples and positions, no second backward.

- linear / conv: per example g = G^T A over positions T (conv: A unfolded, im2col); the norm
  is <A A^T, G G^T> (ghost norm, cost O(T^2 (d + p))) when 2 T^2 < p d, else ||G^T A||^2 from
  the explicit [B, p, d] gradient (Li et al. 2022, Bu et al. 2023).
- embedding: row v of g is the sum of G over positions holding token v, so ||g||^2 is
  sum_{t,s} [id_t = id_s] <G_t, G_s>; positions holding `padding_idx` get no gradient.
- layer_norm / group_norm: g_weight = sum over positions of G * x_hat (the normalized input),
  g_bias = sum of G; both are small, so they are formed explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from funcdp.ghost.capture import CONV, EMBEDDING, GROUP_NORM, LAYER_NORM, LINEAR, OpSpec


class Piece(NamedTuple):
    """One parameter's share: per-example squared norms [B] and the clipped-sum builder."""

    name: str
    squared_norms: torch.Tensor
    book: Callable[[torch.Tensor], torch.Tensor]


def pieces(spec: OpSpec, inputs: torch.Tensor, grads: torch.Tensor, shapes) -> list[Piece]:
    """The pieces of the ghost parameters of one op.

    Args:
      spec: the op, as planned.
      inputs: its input, [B, *one example's input shape], padded rows already zeroed.
      grads: the gradient w.r.t. its output, [B, *spec.out_shape], padded rows zeroed.
      shapes: parameter name -> shape.
    """
    rule = {
        LINEAR: _linear,
        CONV: _conv,
        EMBEDDING: _embedding,
        LAYER_NORM: _layer_norm,
        GROUP_NORM: _group_norm,
    }[spec.kind]
    return rule(spec, inputs, grads, shapes)


def _linear(spec, inputs, grads, shapes):
    size = grads.shape[0]
    a = inputs.reshape(size, -1, 1, inputs.shape[-1])
    g = grads.reshape(size, -1, 1, grads.shape[-1])
    out = []
    if spec.weight is not None:
        out.append(_matmul_piece(spec.weight, a, g, shapes[spec.weight]))
    if spec.bias is not None:
        out.append(_explicit_piece(spec.bias, g.sum(1).flatten(1), shapes[spec.bias]))
    return out


def _conv(spec, inputs, grads, shapes):
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
        out.append(_matmul_piece(spec.weight, a, g, shape))
    if spec.bias is not None:
        out.append(_explicit_piece(spec.bias, g.sum(1).flatten(1), shapes[spec.bias]))
    return out


def _unfold(x: torch.Tensor, kernel: tuple[int, ...], config) -> torch.Tensor:
    """im2col for any nd: [N, C, *S] -> [N, L, C * prod(kernel)], C major as in the weight."""
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
    if nd == 2:  # torch's im2col: [N, C * K, L], read transposed without a copy
        return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)
    for i in range(nd):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    window = (slice(None),) * (2 + nd) + tuple(slice(None, None, d) for d in dilation)
    x = x[window]  # [N, C, *out, *kernel]
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    x = x.permute(order)
    return x.reshape(x.shape[0], math.prod(x.shape[1 : 1 + nd]), -1)


def _tuple(value, nd: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * nd


def _embedding(spec, inputs, grads, shapes):
    size = grads.shape[0]
    ids = inputs.reshape(size, -1)
    g = grads.reshape(size, ids.shape[1], -1)
    padding = spec.config["padding_idx"]
    if padding is not None:
        g = torch.where((ids != padding)[..., None], g, torch.zeros((), dtype=g.dtype))
    same = (ids[:, :, None] == ids[:, None, :]).to(g.dtype)
    squared = (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))
    shape = shapes[spec.weight]

    def book(factors):
        rows = (g * factors.to(g.dtype)[:, None, None]).reshape(-1, g.shape[-1])
        return g.new_zeros(shape).index_add(0, ids.reshape(-1), rows)

    return [Piece(spec.weight, squared, book)]


def _layer_norm(spec, inputs, grads, shapes):
    normalized = spec.config["normalized_shape"]
    x_hat = F.layer_norm(inputs, normalized, eps=spec.config["eps"])
    positions = tuple(range(1, inputs.dim() - len(normalized)))
    return _affine(spec, x_hat, grads, positions, shapes)


def _group_norm(spec, inputs, grads, shapes):
    flat = inputs.flatten(0, 1)  # [B * n, C, *S]: each row is normalized on its own
    x_hat = F.group_norm(flat, spec.config["num_groups"], eps=spec.config["eps"])
    x_hat = x_hat.reshape(inputs.shape)
    positions = (1, *range(3, inputs.dim()))  # all but the example and the channel
    return _affine(spec, x_hat, grads, positions, shapes)


def _affine(spec, x_hat, grads, positions, shapes):
    out = []
    if spec.weight is not None:
        weight = (grads * x_hat).sum(positions) if positions else grads * x_hat
        out.append(_explicit_piece(spec.weight, weight, shapes[spec.weight]))
    if spec.bias is not None:
        bias = grads.sum(positions) if positions else grads
        out.append(_explicit_piece(spec.bias, bias, shapes[spec.bias]))
    return out


def _explicit_piece(name: str, per_example: torch.Tensor, shape) -> Piece:
    """A parameter whose per-example gradient [B, ...] is small enough to form."""
    flat = per_example.reshape(per_example.shape[0], -1)
    squared = torch.linalg.vector_norm(flat, dim=1).square()

    def book(factors):
        return (factors.to(flat.dtype) @ flat).reshape(shape)

    return Piece(name, squared, book)


def _matmul_piece(name: str, a: torch.Tensor, g: torch.Tensor, shape) -> Piece:
    """g_i = sum_t G[i, t]^T A[i, t] per group; a: [B, T, groups, d], g: [B, T, groups, p]."""
    size, positions, groups, d = a.shape
    p = g.shape[-1]
    if positions == 1:  # one position: the gradient is an outer product, ||g||^2 ||a||^2
        squared = (a.square().sum(-1) * g.square().sum(-1)).sum((1, 2))
    else:
        a_rows = a.transpose(1, 2).reshape(size * groups, positions, d)
        g_rows = g.transpose(1, 2).reshape(size * groups, positions, p)
        if 2 * positions * positions < p * d:  # ghost norm: Gram matrices over positions
            gram_a = torch.bmm(a_rows, a_rows.transpose(1, 2))
            gram_g = torch.bmm(g_rows, g_rows.transpose(1, 2))
            squared = (gram_a * gram_g).reshape(size, -1).sum(1)
        else:
            explicit = torch.bmm(g_rows.transpose(1, 2), a_rows)
            squared = torch.linalg.vector_norm(explicit.reshape(size, -1), dim=1).square()

    def book(factors):
        # sum_i c_i G_i^T A_i: scale the smaller of G and A by the factors.
        column = factors.to(g.dtype)[:, None, None, None]
        left, right = (g * column, a) if p <= d else (g, a * column)
        if groups == 1:
            return (left.reshape(-1, p).T @ right.reshape(-1, d)).reshape(shape)
        return torch.einsum("nkp,nkd->kpd", left.flatten(0, 1), right.flatten(0, 1)).reshape(shape)

    return Piece(name, squared, book)

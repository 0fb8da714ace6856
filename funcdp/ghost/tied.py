"""A tied parameter: one weight used by two ops (GPT-2's `wte`, read by the token embedding and
by the output layer `lm_head`).

Its per-example gradient is the SUM g = g_e + g_l of both uses, so its norm is not the sum of
the two norms: ||g||^2 = ||g_e||^2 + ||g_l||^2 + 2 <g_e, g_l>. The cross term, for an embedding
(ids [T], output gradient Ge [T, d]) tied to a linear layer (input A [T', d], output gradient
Gl [T', V]), is

    <g_e, g_l> = sum_{t, s} <Ge_t, A_s> Gl[s, id_t],

O(T T' d) per example, never forming the [V, d] gradient. Certified as the other ghost norms
(`funcdp._certify`): with S_x an upper bound on ||g_x||^2 of the exact gradient of the float32
operands and R_x one on what the book-keeping's rounding adds (`pieces.Piece`), and X + E an upper
bound on the cross term (E: its a priori rounding error),

    ||what the example adds|| <= sqrt(S_e + S_l + 2 (X + E)) + R_e + R_l.

Where the output layer's gradient is formed (`matmul.matmul_form`: long sequences), the
embedding's rows are added into it and the tied gradient's norm is read from the formed sum.
The triangle inequality, N_e + N_l (each piece's own certified bound), holds always; it is used
where the first bound is not available (formed rows, one-position pieces), not
finite, or where the two uses' terms (their `reach`) exceed AMPLIFICATION times the first
bound: such terms would round the other examples' shares in the float32 books (`bounds.flagged`);
the triangle bound clips such an example by the size of its terms instead. Any other repeated
use of a parameter goes to the vmap fallback (`capture.handled`).
"""

from __future__ import annotations

import torch

from funcdp._certify import gamma, matmul_roundoff, sqrt_upper, squares_upper
from funcdp.ghost.bounds import AMPLIFICATION, SMALL_GRAMS
from funcdp.ghost.capture import EMBEDDING, LINEAR
from funcdp.ghost.pieces import Piece, explicit_piece

_U64 = 2.0**-53


def combine(name: str, entries: list[tuple]) -> Piece:
    """One piece for a tied parameter from its (spec, A, G, piece) entries, one per use."""
    kinds = sorted(entry[0].kind for entry in entries)
    if kinds != [EMBEDDING, LINEAR]:
        raise RuntimeError(f"ghost clipping: parameter {name!r} is tied in an unsupported way")
    embedding = next(e for e in entries if e[0].kind == EMBEDDING)
    linear = next(e for e in entries if e[0].kind == LINEAR)
    piece_e, piece_l = embedding[3], linear[3]
    if piece_l.formed is not None:
        tied = _formed_tied(embedding, piece_l.formed)
        return explicit_piece(name, tied, tied.shape[1:])
    norm_e, norm_l = sqrt_upper(piece_e.squared_norms), sqrt_upper(piece_l.squared_norms)
    triangle = (norm_e + norm_l) * (1.0 + 2.0 * _U64)
    bound = triangle
    if piece_e.exact is not None and piece_l.exact is not None:
        cross, error = _cross_term(embedding, linear)
        terms = piece_e.exact + piece_l.exact + 2.0 * (cross + error)
        size = piece_e.exact.abs() + piece_l.exact.abs() + 2.0 * (cross.abs() + error)
        squared = (terms + gamma(4, _U64) * size).clamp(min=0.0)
        rounding = (piece_e.rounding + piece_l.rounding) * (1.0 + 2.0 * _U64)
        certified = (sqrt_upper(squared) + rounding) * (1.0 + 2.0 * _U64)
        # As `bounds.flagged`: this example's terms in the two float32 books, c (reach_e +
        # reach_l), must stay within AMPLIFICATION times what its factor c allows it, C.
        reach = piece_e.reach + piece_l.reach
        usable = torch.isfinite(certified) & (reach <= AMPLIFICATION * certified)
        bound = torch.where(usable, torch.minimum(certified, triangle), triangle)

    def book(factors):
        return piece_e.book(factors) + piece_l.book(factors)

    return Piece(name, bound.square() * (1.0 + 2.0 * _U64), book)


def _formed_tied(embedding, formed: torch.Tensor) -> torch.Tensor:
    """The tied per-example gradient [B, V, d]: the output layer's formed gradient, plus each
    position's embedding output gradient added into its token's row.

    Added in place: `formed` is the output layer's piece's own fresh tensor, which nothing
    reads once the tied piece replaces it (a copy of a language model's [B, V, d] costs more
    than the whole addition)."""
    spec_e, ids, grads_e, _ = embedding
    size = formed.shape[0]
    ids = ids.reshape(size, -1)
    ge = _embedding_grads(spec_e, ids, grads_e)
    tied = formed.reshape(size, -1, ge.shape[-1])  # [B, V, d]
    rows = (ids + tied.shape[1] * torch.arange(size, device=ids.device)[:, None]).flatten()
    tied.view(-1, ge.shape[-1]).index_add_(0, rows, ge.reshape(-1, ge.shape[-1]).to(tied.dtype))
    return tied


def _embedding_grads(spec_e, ids: torch.Tensor, grads_e: torch.Tensor) -> torch.Tensor:
    """[B, T, d], the embedding's output gradients with `padding_idx` positions zeroed (as the
    embedding rule: they get no gradient)."""
    ge = grads_e.reshape(ids.shape[0], ids.shape[1], -1)
    padding = spec_e.config["padding_idx"]
    if padding is not None:
        ge = torch.where((ids != padding)[..., None], ge, torch.zeros((), dtype=ge.dtype))
    return ge


def _cross_term(embedding, linear) -> tuple[torch.Tensor, torch.Tensor]:
    """X [B], the cross term <g_e, g_l> as computed, and E [B], a bound on its error."""
    spec_e, ids, grads_e, _ = embedding
    _, inputs, grads_l, _ = linear
    size = grads_e.shape[0]
    ids = ids.reshape(size, -1)
    ge = _embedding_grads(spec_e, ids, grads_e)
    a = inputs.reshape(size, -1, inputs.shape[-1])
    gl = grads_l.reshape(size, a.shape[1], -1)
    positions, others, d = ids.shape[1], a.shape[1], a.shape[-1]
    # P[b, s, t] = Gl[b, s, id_t]: what position s's output gradient says about token id_t.
    picked = gl.gather(2, ids[:, None, :].expand(size, others, positions)).double()
    if size * positions * others * d <= SMALL_GRAMS:  # cheap in float64: near exact
        products, v = torch.bmm(ge.double(), a.double().transpose(1, 2)), _U64
    else:
        products = torch.bmm(ge, a.transpose(1, 2)).double()
        v = matmul_roundoff(ge.dtype, ge.device)
    weighted = products * picked.transpose(1, 2)  # [B, T, T']
    cross = weighted.sum((1, 2))
    # |error of <Ge_t, A_s>| <= gamma_d |Ge_t| |A_s|; then T T' float64 products and their sum.
    norm_e = sqrt_upper(squares_upper(ge.reshape(size * positions, d))).reshape(size, positions)
    norm_a = sqrt_upper(squares_upper(a.reshape(size * others, d))).reshape(size, others)
    scale = (norm_e[:, :, None] * norm_a[:, None, :] * picked.transpose(1, 2).abs()).sum((1, 2))
    terms = positions * others
    error = gamma(d, v) * scale * (1.0 + gamma(terms + 3, _U64))
    error = error + gamma(terms + 2, _U64) * weighted.abs().sum((1, 2))
    return cross, error

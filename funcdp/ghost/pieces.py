"""A ghost parameter's share of one op: its per-example squared norms and clipped-sum builder."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from funcdp._certify import squares_upper


class Piece(NamedTuple):
    """One parameter's share: per-example squared norms [B] and the clipped-sum builder.

    Gram-form pieces also say how their bound was built, for a tied parameter's cross term
    (`funcdp.ghost.tied`): `exact` [B] bounds the squared norm of the exact gradient of the
    float32 A and G, `rounding` [B] what the book-keeping's rounding adds to its norm, `reach`
    [B] the size of the terms that can cancel (sum over positions of |A_t| |G_t|); `exact` is
    inf on rows whose gradient was formed instead (what they add is not the book's).
    Explicit pieces keep their per-example gradients [B, ...] in `formed`.
    """

    name: str
    squared_norms: torch.Tensor
    book: Callable[[torch.Tensor], torch.Tensor]
    exact: torch.Tensor | None = None
    rounding: torch.Tensor | None = None
    reach: torch.Tensor | None = None
    formed: torch.Tensor | None = None


def explicit_piece(name: str, per_example: torch.Tensor, shape, squared=None) -> Piece:
    """A parameter whose per-example gradient [B, ...] is small enough to form (`squared`: its
    squared norms' bounds, when already known)."""
    flat = per_example.reshape(per_example.shape[0], -1)
    squared = squares_upper(flat) if squared is None else squared

    def book(factors):
        return (factors.to(flat.dtype) @ flat).reshape(shape)

    return Piece(name, squared, book, formed=per_example)

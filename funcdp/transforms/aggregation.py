"""Aggregation: the sum over the real examples of a padded batch."""

from __future__ import annotations

from funcdp._checks import check_mask
from funcdp.transforms.base import REDUCE, GradientTransformation
from funcdp.tree import batch_size_of, tree_map, upcast_half, zero_rows


def aggregate() -> GradientTransformation:
    """Sums per-example gradients over the examples where `mask` is true.

    Padded rows (mask false) contribute exactly zero, even if their gradient is NaN or inf: they
    are selected away, not multiplied by zero. With no mask every row counts. Half-precision
    gradients are summed in float32: a bfloat16 sum would round each addition by up to 2^-9 of
    the running total, far more than one example's bounded share.
    """

    def update(updates, state, params=None, *, key=None, mask=None):
        del params, key
        if mask is None:
            return tree_map(lambda g: upcast_half(g).sum(0), updates), state
        check_mask(mask, batch_size_of(updates))
        return tree_map(lambda g: zero_rows(upcast_half(g), mask).sum(0), updates), state

    return GradientTransformation(lambda params: (), update, REDUCE)

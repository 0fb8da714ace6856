"""Per-example clipping: bound each example's contribution to the aggregated gradient."""

from __future__ import annotations

import torch

from funcdp._checks import check_positive
from funcdp.transforms.base import PER_EXAMPLE, GradientTransformation
from funcdp.tree import per_example_norms, tree_map


def clip(max_norm: float) -> GradientTransformation:
    """Scales each example's gradient to L2 norm at most `max_norm` (flat clipping).

    Example i is multiplied by min(1, C / ||g_i||), so ||clipped g_i|| <= C and adding or
    removing one example moves the sum by at most C: the declared sensitivity is C.

    Raises:
      ValueError: max_norm is not a finite number > 0.
    """
    check_positive("max_norm", max_norm)
    max_norm = float(max_norm)

    def update(updates, state, params=None, *, key=None, mask=None):
        del params, key, mask
        norms = per_example_norms(updates)
        factors = max_norm / torch.clamp(norms, min=max_norm)
        return scale_examples(updates, factors), state

    return GradientTransformation(lambda params: (), update, PER_EXAMPLE, sensitivity=max_norm)


def scale_examples(updates, factors: torch.Tensor):
    """Multiplies example i of every [B, ...] leaf by factors[i]."""

    def scale(leaf: torch.Tensor) -> torch.Tensor:
        shaped = factors.reshape((-1,) + (1,) * (leaf.dim() - 1))
        return (leaf * shaped).to(leaf.dtype)

    return tree_map(scale, updates)

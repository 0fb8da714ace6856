"""Normalization of the noisy sum by the expected batch size."""

from __future__ import annotations

import math

from funcdp._checks import check_positive
from funcdp.transforms.base import AGGREGATE, GradientTransformation, PrivacyContext
from funcdp.tree import tree_scale


def normalize(expected_batch_size: float) -> GradientTransformation:
    """Divides the aggregated gradient by the EXPECTED batch size (q * dataset size).

    With Poisson sampling the realised batch size depends on who is in the batch; dividing by it
    would leak that through the update, so DP-SGD divides by its expectation instead.

    Raises:
      ValueError: expected_batch_size is not a finite number > 0, or so small that
        1 / expected_batch_size is not finite.
    """
    check_positive("expected_batch_size", expected_batch_size)
    factor = 1.0 / float(expected_batch_size)
    if not math.isfinite(factor):
        raise ValueError(
            f"expected_batch_size must be large enough that 1 / expected_batch_size is a finite "
            f"factor, got {expected_batch_size!r} (1 / it is {factor!r})"
        )

    def update(updates, state, params=None, *, key=None, mask=None):
        del params, key, mask
        return tree_scale(updates, factor), state

    def bind(context: PrivacyContext) -> tuple[GradientTransformation, PrivacyContext]:
        return transform._replace(bind=None), context._replace(scale=context.scale * factor)

    transform = GradientTransformation(lambda params: (), update, AGGREGATE, bind=bind)
    return transform

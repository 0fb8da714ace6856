"""Factor rules shared by the clipping engines: the transforms, `clipped_sum` and ghost clipping.

A factor rule maps per-example norms (upper bounds, see `funcdp._certify`) to the factor that
scales each example; it promises factor(n) * n <= its sensitivity for every n >= 0, so applying
it to an upper bound of the true norm keeps the scaled example within the bound.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def flat_factors(max_norm: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The factor rule of flat clipping, min(1, C / n)."""
    return lambda norms: max_norm / torch.clamp(norms, min=max_norm)

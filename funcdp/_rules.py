"""Factor rules shared by the clipping engines: the transforms, `clipped_sum` and ghost clipping.

A factor rule maps per-example norms (upper bounds, see `funcdp._certify`) to the factor that
scales each example; it promises factor(n) * n <= its sensitivity for every n >= 0, so applying
it to an upper bound of the true norm keeps the scaled example within the bound.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def flat_factors(max_norm: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The factor rule of flat clipping, min(1, C / n), in the norms' dtype.

    n is compared with C in float64: exactly 1 where n <= C (a C such as 0.1 is not a float32
    value, and C / max(n, C) computed in float32 came out one unit below 1 for every unclipped
    example, which counted it as clipped); C / n elsewhere (NaN stays NaN, inf gives 0).
    """

    def factors(norms: torch.Tensor) -> torch.Tensor:
        wide = norms.double()
        return torch.where(wide <= max_norm, 1.0, max_norm / wide).to(norms.dtype)

    return factors

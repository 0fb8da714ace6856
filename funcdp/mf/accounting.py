"""How a strategy's steps are accounted, for the sampler that feeds it."""

from __future__ import annotations

import math

from funcdp.accounting.ledger import Mechanism
from funcdp.mf.strategies import Strategy


def mechanism(
    strategy: Strategy, *, min_separation: int | None = None, poisson: bool = True
) -> Mechanism:
    """The `Mechanism` the ledger records for `strategy` fed by (cyclic) Poisson sampling.

    Amplified BandMF (banded C with bands <= b, batches from `cyclic_poisson_batches` with b
    groups): each of a unit's ceil(n / b) participations touches rows of C that no other
    touches, so the run composes Poisson-subsampled Gaussians with noise multiplier
    sigma * s / (largest column norm of C) (Choquette-Choo et al. 2023, "(Amplified) Banded
    Matrix Factorization", arXiv:2306.08153; JAX Privacy accounts it the same way). Every
    other strategy (BLT, tree, banded with
    bands > b) is one Gaussian mechanism with noise multiplier sigma over the run: its noise is
    scaled to the sensitivity s of the whole participation pattern, and no amplification by
    sampling is claimed.

    Args:
      strategy: a strategy from `funcdp.mf`.
      min_separation: the b of the sampler (`cyclic_poisson_batches(min_separation=b)`; 1 for
        `poisson_batches`); default the strategy's own.
      poisson: False for batches that are not (cyclic) Poisson samples.

    Raises:
      ValueError: a sampler whose participation pattern the strategy was not normalized for.
    """
    b = strategy.min_separation if min_separation is None else min_separation
    if b != strategy.min_separation:
        raise ValueError(
            f"the sampler's min_separation={b!r} must equal the strategy's min_separation="
            f"{strategy.min_separation}: the strategy's noise is scaled to participations that "
            f"far apart; sample with cyclic_poisson_batches(min_separation="
            f"{strategy.min_separation}) (poisson_batches is min_separation=1)"
        )
    if not poisson:
        raise ValueError(
            "correlated noise needs (cyclic) Poisson batches: shuffled fixed-size batches give "
            "neither the amplification nor the participation pattern the strategy assumes"
        )
    factor = strategy.amplification_factor()
    if factor is not None:
        return Mechanism(b, strategy.steps, True, factor)
    most = math.ceil(strategy.steps / b)
    if strategy.max_participations != most:
        raise ValueError(
            f"the strategy is normalized for max_participations={strategy.max_participations}, "
            f"but Poisson sampling with min_separation={b} can put a unit in {most} of its "
            f"{strategy.steps} steps: build it with max_participations={most} (the default)"
        )
    return Mechanism(b, strategy.steps, False, 1.0)

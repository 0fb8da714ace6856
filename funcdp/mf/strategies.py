"""Correlated-noise strategies as plain data: banded Toeplitz (BandMF), BLT and the binary tree.

A strategy is a lower-triangular n x n matrix C with unit diagonal; the mechanism releases the
prefix sums of the gradients through C x + z, which in SGD amounts to adding `(C^-1 z)_t` to the
gradient of step t. Each strategy keeps the participation pattern it is normalized for
(b-min-separation with at most k participations, `min_separation` and `max_participations`),
generates `C^-1 z` from a small state (`stream_init`, `stream_step`), and gives its dense forms
for small n (`strategy_matrix`, `inverse_matrix`, `noise_matrix`).

The noise matrix M = s C^-1, with s the sensitivity of C under the strategy's pattern, is the
one a unit-sensitivity release sees: `correlated_noise` adds sigma * clip * (M z)_t at step t.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from funcdp.mf import streaming
from funcdp.mf.optimize import blt_coefficients, toeplitz_inverse
from funcdp.mf.sensitivity import (
    check_participation,
    cyclic_sensitivity,
    min_separation_sensitivity,
    toeplitz_sensitivity,
)

_DTYPE = torch.float64


@dataclass(frozen=True)
class Strategy:
    """What every strategy shares; subclasses define the matrix and the stream."""

    steps: int
    min_separation: int
    max_participations: int

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        check_participation(self.steps, self.min_separation, self.max_participations)

    def strategy_matrix(self, n: int | None = None) -> torch.Tensor:
        """The dense C [n, n] (float64, unit diagonal); n defaults to `steps`."""
        raise NotImplementedError

    def inverse_matrix(self, n: int | None = None) -> torch.Tensor:
        """The dense C^-1 [n, n] (float64)."""
        c = self.strategy_matrix(n)
        return torch.linalg.solve_triangular(c, torch.eye(len(c), dtype=_DTYPE), upper=False)

    def noise_matrix(self, n: int | None = None) -> torch.Tensor:
        """M = s C^-1 [n, n]: C^-1 for C normalized to sensitivity 1 under its pattern."""
        return self.noise_scale * self.inverse_matrix(n)

    @functools.cached_property
    def noise_scale(self) -> float:
        """s, the sensitivity of C under the strategy's own participation pattern."""
        return self.sensitivity()

    def sensitivity(
        self,
        *,
        min_separation: int | None = None,
        max_participations: int | None = None,
        cyclic: bool = False,
    ) -> float:
        """The sensitivity of C (unnormalized) under a participation pattern (an upper bound,
        exact where C^T C >= 0 entrywise; see `funcdp.mf.sensitivity`).

        Args:
          min_separation: b; default the strategy's own.
          max_participations: k; default the strategy's own when b is, else ceil(steps / b).
            Single participation is `max_participations=1`.
          cyclic: the cyclic (k, b) pattern (steps i, i + b, ...) instead of b-min-separation.
        """
        b = self.min_separation if min_separation is None else min_separation
        if max_participations is None:
            own = b == self.min_separation
            max_participations = self.max_participations if own else math.ceil(self.steps / b)
        check_participation(self.steps, b, max_participations)
        if cyclic:
            return cyclic_sensitivity(
                self.strategy_matrix(), min_separation=b, max_participations=max_participations
            )
        return self._min_separation_sensitivity(b, max_participations)

    def _min_separation_sensitivity(self, b: int, k: int) -> float:
        return min_separation_sensitivity(
            self.strategy_matrix(), min_separation=b, max_participations=k
        )

    def amplification_factor(self) -> float | None:
        """s / (largest column norm of C) when each participation of a cyclic-Poisson unit
        touches rows of C no other touches (amplified BandMF), else None."""
        return None

    def stream_init(self, like: torch.Tensor) -> torch.Tensor:
        """The zero streaming state [m, *like.shape] for a tensor like `like`."""
        return torch.zeros((self._buffers(), *like.shape), dtype=like.dtype, device=like.device)

    def stream_step(
        self, state: torch.Tensor, z: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((C^-1 z)_t, new state) from the state after step t - 1 and the draw z_t."""
        raise NotImplementedError

    def _buffers(self) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class BandedStrategy(Strategy):
    """Banded lower-triangular Toeplitz C (BandMF, Choquette-Choo et al. 2023): c_0 = 1, c_l
    for l < bands, zero beyond. Its stream keeps the last `bands - 1` noise outputs."""

    coefficients: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        super().__post_init__()
        bands = len(self.coefficients)
        if not 1 <= bands <= self.steps or self.coefficients[0] != 1.0:
            raise ValueError(
                f"coefficients must hold 1 to steps={self.steps} values starting with 1.0, got "
                f"{self.coefficients!r}"
            )

    @property
    def bands(self) -> int:
        """The number of non-zero diagonals of C."""
        return len(self.coefficients)

    def strategy_matrix(self, n: int | None = None) -> torch.Tensor:
        return _toeplitz(torch.tensor(self.coefficients, dtype=_DTYPE), n or self.steps)

    def inverse_matrix(self, n: int | None = None) -> torch.Tensor:
        n = n or self.steps
        c = torch.tensor(self.coefficients, dtype=_DTYPE)
        return _toeplitz(toeplitz_inverse(c, n), n)

    def _min_separation_sensitivity(self, b: int, k: int) -> float:
        c = torch.tensor(self.coefficients, dtype=_DTYPE)
        if self.bands <= b:  # participations touch disjoint rows: sum of column norms squared
            norms = torch.stack(
                [c[: self.steps - start].square().sum() for start in range(0, self.steps, b)]
            )
            return math.sqrt(float(norms.sort(descending=True).values[:k].sum()))
        exact = toeplitz_sensitivity(c, self.steps, min_separation=b, max_participations=k)
        return exact if exact is not None else super()._min_separation_sensitivity(b, k)

    def amplification_factor(self) -> float | None:
        if self.bands > self.min_separation:
            return None
        column = math.sqrt(sum(c * c for c in self.coefficients))
        return self.noise_scale / column

    def stream_step(self, state, z, index):
        del index  # Toeplitz: the same recurrence at every step
        return streaming.banded_step(state, z, self.coefficients)

    def _buffers(self) -> int:
        return self.bands - 1


@dataclass(frozen=True)
class BltStrategy(Strategy):
    """Buffered linear Toeplitz C (McMahan, Xu & Zhang 2024): Toeplitz with coefficients 1 and
    sum_i omega_i theta_i^(m-1) for m >= 1; its stream solves C y = z with `len(thetas)`
    buffers."""

    thetas: tuple[float, ...] = ()
    omegas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.thetas) != len(self.omegas) or not all(0 < t < 1 for t in self.thetas):
            raise ValueError(
                "thetas and omegas must have equal lengths with every theta in (0, 1), got "
                f"thetas={self.thetas!r}, omegas={self.omegas!r}"
            )

    def coefficients(self, n: int | None = None) -> torch.Tensor:
        """The first n Toeplitz coefficients of C."""
        thetas = torch.tensor(self.thetas, dtype=_DTYPE)
        return blt_coefficients(thetas, torch.tensor(self.omegas, dtype=_DTYPE), n or self.steps)

    def strategy_matrix(self, n: int | None = None) -> torch.Tensor:
        return _toeplitz(self.coefficients(n), n or self.steps)

    def inverse_matrix(self, n: int | None = None) -> torch.Tensor:
        n = n or self.steps
        return _toeplitz(toeplitz_inverse(self.coefficients(n), n), n)

    def _min_separation_sensitivity(self, b: int, k: int) -> float:
        exact = toeplitz_sensitivity(
            self.coefficients(), self.steps, min_separation=b, max_participations=k
        )
        return exact if exact is not None else super()._min_separation_sensitivity(b, k)

    def stream_step(self, state, z, index):
        del index
        return streaming.blt_step(state, z, self.thetas, self.omegas)

    def _buffers(self) -> int:
        return len(self.thetas)


@dataclass(frozen=True)
class TreeStrategy(Strategy):
    """The binary tree of DP-FTRL (Kairouz et al. 2021), square form: row t of C sums the
    gradients of the dyadic node that step t closes, so B = A C^-1 adds the nodes of t's binary
    decomposition. Its stream keeps one noise draw per level."""

    def strategy_matrix(self, n: int | None = None) -> torch.Tensor:
        n = n or self.steps
        rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
        closed = (rows + 1) & -(rows + 1)  # the length of the node that step t closes
        return ((cols > rows - closed) & (cols <= rows)).to(_DTYPE)

    def stream_step(self, state, z, index):
        return streaming.tree_step(state, z, index)

    def _buffers(self) -> int:
        return self.steps.bit_length()


def _toeplitz(coefficients: torch.Tensor, n: int) -> torch.Tensor:
    padded = torch.zeros(n, dtype=_DTYPE)
    length = min(n, coefficients.shape[0])
    padded[:length] = coefficients[:length]
    lags = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    return torch.where(lags >= 0, padded[lags.clamp(min=0)], torch.zeros((), dtype=_DTYPE))

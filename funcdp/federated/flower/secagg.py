"""SecAgg+ settings and what its quantization does to a clipped update's bound.

Flower's SecAgg+ sums integer vectors: each client maps a coordinate x in [-R, R] to
(x + R) * T / (2R) and rounds it stochastically to an integer, so the server's dequantized sum
of n clients differs from the real sum by less than n * 2R / T per coordinate (each rounding
moves a coordinate by less than one step 2R / T). funcdp sets R = C, the clip norm: a clipped
update's coordinates never exceed it, so SecAgg+'s own clipping never cuts.

The rounding could push one client's contribution above C, by up to sqrt(d) steps in L2 norm
over d coordinates. Clients therefore scale their clipped update by `update_scale` (a factor a
little below 1) before it is quantized, so the dequantized contribution stays within C and the
noise calibrated to C keeps its guarantee.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from funcdp._checks import check_positive


class SecAggPlus(NamedTuple):
    """The SecAgg+ protocol's settings (Bell et al. 2020), as Flower's `SecAggPlusWorkflow` takes them.

    Attributes:
      num_shares: shares each client's secrets are split into (an int > 2: the number of
        neighbours, itself included; a float in (0, 1]: that fraction of the sampled clients).
      reconstruction_threshold: shares needed to rebuild a secret (an int >= 2, below
        num_shares when both are ints; a float in (0, 1]: that fraction of num_shares). The
        protocol tolerates clients dropping out as long as each one keeps this many live
        neighbours.
      quantization_range: T, the number of integer levels a coordinate is mapped to (an int
        in [2, 2^30]).
      modulus_range: M, the modulus of the masked sums (a power of two above
        quantization_range, at most 2^32); a round may sum at most (M - 1) // T clients.
      timeout: seconds the server waits for the replies of each stage (None: forever). Set it
        to let the round go on without clients that vanish.
    """

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.5
    quantization_range: int = 1 << 22
    modulus_range: int = 1 << 32
    timeout: float | None = None

    def check(self) -> SecAggPlus:
        """Returns self after checking every field (raises ValueError naming the bad one)."""
        _check_share_count("num_shares", self.num_shares, minimum=3)
        _check_share_count("reconstruction_threshold", self.reconstruction_threshold, minimum=2)
        if isinstance(self.num_shares, int) and isinstance(self.reconstruction_threshold, int):
            if self.reconstruction_threshold >= self.num_shares:
                raise ValueError(
                    f"reconstruction_threshold must be below num_shares={self.num_shares}, "
                    f"got {self.reconstruction_threshold}"
                )
        if not _is_int(self.quantization_range) or not 2 <= self.quantization_range <= 1 << 30:
            raise ValueError(
                f"quantization_range must be an int in [2, 2^30], got {self.quantization_range!r}"
            )
        modulus = self.modulus_range
        if (
            not _is_int(modulus)
            or modulus > 1 << 32
            or modulus <= self.quantization_range
            or modulus & (modulus - 1)
        ):
            raise ValueError(
                "modulus_range must be a power of two in (quantization_range, 2^32], got "
                f"{modulus!r}"
            )
        if self.timeout is not None:
            check_positive("timeout", self.timeout)
        return self

    @property
    def max_clients(self) -> int:
        """The most clients one round can sum without the masked sum wrapping around M."""
        return (self.modulus_range - 1) // self.quantization_range

    def step(self, sensitivity: float) -> float:
        """The quantization step 2C / T, with the clipping range R set to the clip norm C."""
        check_positive("sensitivity", sensitivity)
        return 2.0 * float(sensitivity) / self.quantization_range

    def error_bound(self, sensitivity: float, *, clients: int) -> float:
        """A bound on |dequantized sum - real sum| per coordinate for `clients` clients.

        Each client's stochastic rounding moves a coordinate by less than one step; the float64
        arithmetic around it adds far less than the 1% slack included here.
        """
        if not _is_int(clients) or clients < 0:
            raise ValueError(f"clients must be an int >= 0, got {clients!r}")
        return 1.01 * clients * self.step(sensitivity)

    def update_scale(self, sensitivity: float, *, num_coordinates: int) -> float:
        """The factor a client multiplies its clipped update by before SecAgg+ quantizes it.

        A clipped update u has ||u|| <= C. Quantized, each of its d coordinates moves by less
        than one step h = 2C / T (plus float64 rounding, far below h), so ||s u + error|| <=
        s C + sqrt(d) h, which is at most C for s = 1 - 2 sqrt(d) h / C (twice the needed
        margin). The noise calibrated to C then covers what the server receives.

        Raises:
          ValueError: num_coordinates is not an int >= 1, or quantization_range is too small
            for that many coordinates (the factor would fall below 1/2).
        """
        if not _is_int(num_coordinates) or num_coordinates < 1:
            raise ValueError(f"num_coordinates must be an int >= 1, got {num_coordinates!r}")
        margin = 2.0 * math.sqrt(num_coordinates) * self.step(sensitivity) / float(sensitivity)
        if margin > 0.5:
            raise ValueError(
                f"quantization_range={self.quantization_range} is too coarse for a model of "
                f"{num_coordinates} coordinates: the rounding margin would take {margin:.3g} of "
                "the clip norm; raise quantization_range"
            )
        return 1.0 - margin


def _check_share_count(name: str, value: int | float, *, minimum: int) -> None:
    if _is_int(value):
        if value < minimum:
            raise ValueError(
                f"{name} must be an int >= {minimum} or a float in (0, 1], got {value}"
            )
    elif not isinstance(value, float) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be an int >= {minimum} or a float in (0, 1], got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

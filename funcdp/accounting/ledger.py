"""The privacy ledger: an immutable record of the DP-SGD steps taken, saved with the state."""

from __future__ import annotations

from typing import NamedTuple

import dp_accounting

from funcdp._checks import check_noise_multiplier, check_sample_rate


class LedgerRecord(NamedTuple):
    """`steps` releases of the subsampled Gaussian mechanism with these parameters.

    `poisson` is False for steps on shuffled fixed-size batches: they are accounted as if
    Poisson-sampled at `sample_rate`, and `epsilon` warns that the figure assumes it.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    poisson: bool = True


class Ledger(NamedTuple):
    """Plain data: the records of every mechanism run so far, equal parameters merged.

    Composition is commutative, so records with the same (noise_multiplier, sample_rate) are
    merged wherever they stand; `record` returns a new ledger and never mutates this one.
    """

    records: tuple[LedgerRecord, ...] = ()

    def record(
        self, noise_multiplier: float, sample_rate: float, steps: int = 1, *, poisson: bool = True
    ) -> Ledger:
        """A new ledger with `steps` more releases at (noise_multiplier, sample_rate)."""
        check_noise_multiplier(noise_multiplier)
        check_sample_rate(sample_rate)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        noise_multiplier, sample_rate = float(noise_multiplier), float(sample_rate)
        new = LedgerRecord(noise_multiplier, sample_rate, steps, bool(poisson))
        records = list(self.records)
        for i, rec in enumerate(records):
            if rec._replace(steps=0) == new._replace(steps=0):
                records[i] = rec._replace(steps=rec.steps + steps)
                return Ledger(tuple(records))
        return Ledger((*records, new))

    @property
    def steps(self) -> int:
        """The total number of steps recorded."""
        return sum(rec.steps for rec in self.records)

    def to_dp_event(self) -> dp_accounting.DpEvent:
        """The composed `dp_accounting` event, to combine with other mechanisms."""
        return dp_accounting.ComposedDpEvent([_record_event(rec) for rec in self.records])


def _record_event(rec: LedgerRecord) -> dp_accounting.DpEvent:
    gaussian = (
        dp_accounting.GaussianDpEvent(rec.noise_multiplier)
        if rec.noise_multiplier > 0
        else dp_accounting.NonPrivateDpEvent()
    )
    sampled = (
        gaussian
        if rec.sample_rate == 1.0
        else dp_accounting.PoissonSampledDpEvent(rec.sample_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(sampled, rec.steps)

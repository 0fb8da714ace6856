"""The privacy ledger: an immutable record of the mechanisms run, saved with the train state."""

from __future__ import annotations

import math
from typing import NamedTuple

import dp_accounting

from funcdp._checks import check_noise_multiplier, check_positive, check_sample_rate


class Mechanism(NamedTuple):
    """How the steps of one record compose, beyond (noise_multiplier, sample_rate, steps).

    The default is DP-SGD: independent Gaussian noise, one Poisson-subsampled Gaussian per step.

    Attributes:
      min_separation: b, the sampler's number of cyclic groups (`cyclic_poisson_batches`): a
        unit can only join the steps of its group, so it takes part in at most ceil(steps / b)
        of them. 1 for plain Poisson sampling.
      horizon: the steps one correlated-noise run serves (its strategy's n); 0 for independent
        noise. Steps past a horizon belong to a further run.
      amplified: True: each participation is a Poisson-subsampled Gaussian with noise
        multiplier `noise_multiplier * participation_factor` (DP-SGD; amplified BandMF, whose
        participations touch disjoint rows of C: Choquette-Choo et al. 2023, "Amplified
        BandMF"). False: each run is ONE Gaussian mechanism with noise multiplier
        `noise_multiplier` (the noise is scaled to the run's whole sensitivity), with no
        amplification by sampling (Denisov et al. 2022; Choquette-Choo et al. 2023).
      participation_factor: s / (largest column norm of C) for amplified BandMF, 1 for DP-SGD.
    """

    min_separation: int = 1
    horizon: int = 0
    amplified: bool = True
    participation_factor: float = 1.0


DPSGD = Mechanism()
"""Independent Gaussian noise at every step, Poisson-sampled: the default mechanism."""


class LedgerRecord(NamedTuple):
    """`steps` releases of one mechanism with these parameters.

    `poisson` is False for steps on shuffled fixed-size batches: they are accounted as if
    Poisson-sampled at `sample_rate`, and `epsilon` warns that the figure assumes it. The last
    four fields are those of `Mechanism` (plain numbers, so that a saved state loads with
    `torch.load(weights_only=True)`); their defaults are DP-SGD's.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    poisson: bool = True
    min_separation: int = 1
    horizon: int = 0
    amplified: bool = True
    participation_factor: float = 1.0

    @property
    def mechanism(self) -> Mechanism:
        """The record's `Mechanism`."""
        return Mechanism(*self[4:])


class Ledger(NamedTuple):
    """Plain data: the records of every mechanism run so far, equal parameters merged.

    Composition is commutative, so records with the same parameters are merged wherever they
    stand; `record` returns a new ledger and never mutates this one.
    """

    records: tuple[LedgerRecord, ...] = ()

    def record(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int = 1,
        *,
        poisson: bool = True,
        mechanism: Mechanism = DPSGD,
    ) -> Ledger:
        """A new ledger with `steps` more releases at (noise_multiplier, sample_rate)."""
        check_noise_multiplier(noise_multiplier)
        check_sample_rate(sample_rate)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        mechanism = _checked(mechanism)
        noise_multiplier, sample_rate = float(noise_multiplier), float(sample_rate)
        new = LedgerRecord(noise_multiplier, sample_rate, steps, bool(poisson), *mechanism)
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


def participations(steps: int, mechanism: Mechanism) -> int:
    """The most steps of `steps` one unit can join: ceil(steps / b) per run of `horizon` steps
    (every step for b = 1)."""
    b, horizon = mechanism.min_separation, mechanism.horizon
    if horizon == 0:
        return math.ceil(steps / b)
    runs, rest = divmod(steps, horizon)
    return runs * math.ceil(horizon / b) + math.ceil(rest / b)


def _record_event(rec: LedgerRecord) -> dp_accounting.DpEvent:
    mechanism = rec.mechanism
    if not mechanism.amplified:  # one Gaussian release per run of the strategy
        gaussian = _gaussian(rec.noise_multiplier)
        return dp_accounting.SelfComposedDpEvent(gaussian, math.ceil(rec.steps / mechanism.horizon))
    gaussian = _gaussian(rec.noise_multiplier * mechanism.participation_factor)
    sampled = (
        gaussian
        if rec.sample_rate == 1.0
        else dp_accounting.PoissonSampledDpEvent(rec.sample_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(sampled, participations(rec.steps, mechanism))


def _gaussian(noise_multiplier: float) -> dp_accounting.DpEvent:
    if noise_multiplier > 0:
        return dp_accounting.GaussianDpEvent(noise_multiplier)
    return dp_accounting.NonPrivateDpEvent()


def _checked(mechanism: Mechanism) -> Mechanism:
    if not isinstance(mechanism, Mechanism):
        raise TypeError(f"mechanism must be a funcdp Mechanism, got {type(mechanism).__name__}")
    b, horizon, amplified, factor = mechanism
    if not isinstance(b, int) or isinstance(b, bool) or b < 1:
        raise ValueError(f"min_separation must be an int >= 1, got {b!r}")
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 0:
        raise ValueError(f"horizon must be an int >= 0, got {horizon!r}")
    if not amplified and horizon == 0:
        raise ValueError("an un-amplified mechanism needs its horizon (the strategy's steps) > 0")
    check_positive("participation_factor", factor)
    return Mechanism(b, horizon, bool(amplified), float(factor))

"""`GradientTransformation`, the privacy context it declares, and `chain`.

A transform is a pair of pure functions, optax-style: `init(params) -> state` and
`update(updates, state, params=None, *, key=None, mask=None) -> (updates, state)`. Beside them
it declares where it may stand in a privacy chain:

- `stage`: `"per_example"` (sees and returns a tree of [B, ...] leaves), `"reduce"` (sees
  per-example leaves, returns one tree: `aggregate()` is the boundary), or `"aggregate"` (sees
  and returns one tree);
- `sensitivity`: for a clipping transform, the L2 bound of one example's contribution to the sum;
- `bind`: for a transform that needs what stands upstream (noise needs the sensitivity, the
  accountant needs the noise multiplier), a function from the `PrivacyContext` upstream to the
  concrete transform and the context it passes downstream;
- `finish`: for a per-example transform that accumulates batch statistics in its state (adaptive
  clipping counts the unclipped examples), `finish(state, *, key) -> state` closes one logical
  batch. A chain's `update` calls it after all parts ran; a train step that feeds the first half
  of a split chain micro-batch by micro-batch calls it once, after the last micro-batch.

`chain` checks the order once, when it is built, so a misordered pipeline never runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from funcdp import random as fdr

PER_EXAMPLE = "per_example"
REDUCE = "reduce"
AGGREGATE = "aggregate"
STAGES = (PER_EXAMPLE, REDUCE, AGGREGATE)


class PrivacyContext(NamedTuple):
    """What the transforms upstream guarantee, carried down a chain while it is built.

    Attributes:
      sensitivity: L2 bound of one example's contribution (set by a clipping transform).
      scale: factor applied to the sum since aggregation (`normalize` divides it).
      noise_multiplier: sigma of the Gaussian noise added (set by `gaussian_noise`).
      sample_rate: Poisson sampling rate (set by `account`).
      reduced: whether `aggregate()` has run, so leaves no longer have a batch dimension.
      count_noise_multiplier: sigma_b of a privatized count released beside the gradient
        (adaptive clipping); `gaussian_noise` then raises the gradient's noise multiplier so
        that both releases together spend what the accountant records.
      secure: whether the noise is drawn from the operating system's entropy (it then differs
        between processes, which a process group must refuse).
      checks: functions of a chain's new state that refuse an update before it is returned
        (`budget` reads the ledger that `account` keeps); they raise.
      strategy: the `funcdp.mf` strategy of `correlated_noise` (None for independent noise),
        from which `account` derives how the steps compose.
    """

    sensitivity: float | None = None
    scale: float = 1.0
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    reduced: bool = False
    count_noise_multiplier: float | None = None
    secure: bool = False
    checks: tuple[Callable[[tuple], None], ...] = ()
    strategy: Any = None


Bind = Callable[[PrivacyContext], tuple["GradientTransformation", PrivacyContext]]


class FactorRule(NamedTuple):
    """A clipping transform's rule as data, so that an engine can apply it without the tree.

    `factor_fn` maps per-example norms [B, G] of the groups of leaves to factors [B, G];
    `groups` maps a leaf's path to its group's name (None: one group) and `group_names` orders
    the columns. The ghost mode of the train step computes the norms and the factored sum
    itself from these.
    """

    factor_fn: Callable[[Any], Any]
    groups: Callable[[str], str] | None = None
    group_names: tuple[str, ...] | None = None


class Plan(NamedTuple):
    """What `chain` resolved when it was built, kept so that nothing binds it again.

    Attributes:
      parts: the transforms it is made of, unbound, in order (an outer chain that nests this one
        binds them against ITS upstream context).
      bound: the same parts bound against the chain's own context, as its `update` runs them.
      context: what the chain resolves to (sensitivity, noise, sample rate, secure, checks).
    """

    parts: tuple
    bound: tuple
    context: PrivacyContext


class GradientTransformation(NamedTuple):
    """A pure gradient transformation and its declared place in a privacy chain.

    Attributes:
      init: `init(params) -> state`.
      update: `update(updates, state, params=None, *, key=None, mask=None) -> (updates, state)`.
      stage: "per_example", "reduce" or "aggregate" (see the module docstring).
      sensitivity: for clipping transforms, the per-example L2 bound of the contribution.
      bind: resolves the transform against the context upstream; None if it needs none.
      plan: for a chain, what it was built from and resolved to (`Plan`); None otherwise.
      finish: `finish(state, *, key) -> state`, closing one logical batch for a transform whose
        `update` only accumulates statistics; None for transforms that need no such step.
      factor_rule: for a stateless clipping transform, its rule as a `FactorRule`; None when it
        has none (the ghost mode needs it).
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    stage: str = AGGREGATE
    sensitivity: float | None = None
    bind: Bind | None = None
    plan: Plan | None = None
    finish: Callable[..., Any] | None = None
    factor_rule: FactorRule | None = None

    @property
    def parts(self) -> tuple[GradientTransformation, ...]:
        """A chain's transforms, unbound, in order; () for any other transform."""
        return () if self.plan is None else self.plan.parts


def identity() -> GradientTransformation:
    """A transform that changes nothing (stage "aggregate")."""

    def update(updates, state, params=None, *, key=None, mask=None):
        del params, key, mask
        return updates, state

    return GradientTransformation(lambda params: (), update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Composes transforms in order, checking their stages and carrying sensitivity downstream.

    The state of a chain is a tuple with one entry per transform. Each transform receives its own
    key, `fold_in(key, index)`, and the chain's mask.

    Raises:
      ValueError: a per-example transform after aggregation, an aggregate-stage transform
        before it, two aggregations, or a transform whose `bind` refuses its context (noise
        without a bounded-sensitivity clip upstream, accounting without noise).
    """
    parts = _flatten(transforms)
    bound, context = bind_parts(parts)  # the one binding: kept in the chain's plan
    init, update, _ = _compose(bound, 0, True, context.checks)
    plan = Plan(parts, bound, context)
    return GradientTransformation(init, update, _stage_of(bound), context.sensitivity, plan=plan)


def bind_parts(
    parts: tuple[GradientTransformation, ...],
) -> tuple[tuple[GradientTransformation, ...], PrivacyContext]:
    """Checks the order of `parts` and resolves each against the context upstream of it.

    A per-example transform sets the sensitivity to what it declares: one that declares none
    leaves it unknown, since it could scale an example past the bound of a clip before it. A
    chain with no per-example or reduce part (an optimizer chain, say) starts after aggregation.
    """
    aggregated_only = all(part.stage == AGGREGATE for part in parts)
    context = PrivacyContext(reduced=aggregated_only)
    bound = []
    for index, part in enumerate(parts):
        if part.stage not in STAGES:
            raise ValueError(
                f"transform {index} has unknown stage {part.stage!r}; use one of {STAGES}"
            )
        if part.stage in (PER_EXAMPLE, REDUCE) and context.reduced:
            raise ValueError(
                f"transform {index} works on per-example gradients (stage {part.stage!r}) but stands "
                "after aggregate(); clip and aggregate before adding noise or normalizing"
            )
        if part.stage == AGGREGATE and not context.reduced:
            raise ValueError(
                f"transform {index} works on the aggregated gradient but stands before aggregate(); "
                "put aggregate() between the per-example transforms (clipping) and it"
            )
        if part.stage == PER_EXAMPLE:
            declared = None if part.sensitivity is None else float(part.sensitivity)
            context = context._replace(sensitivity=declared)
        if part.bind is not None:
            part, context = part.bind(context)
        if part.stage == REDUCE:
            context = context._replace(reduced=True)
        bound.append(part)
    return tuple(bound), context


class Split(NamedTuple):
    """A privatizer bound once and split at `aggregate()`: what a train step runs.

    Attributes:
      through_sum: the parts through `aggregate()`, run on each micro-batch; its `finish` (when
        not None) closes one logical batch.
      after_sum: the parts after it, run once per logical batch, with the chain's checks.
      index: where the second half's state starts in the chain's state.
      context: what the whole chain resolves to (sensitivity, noise, sample rate, secure, ...).
      head: the bound parts of `through_sum` (an engine reads their clipping rule).
    """

    through_sum: GradientTransformation
    after_sum: GradientTransformation
    index: int
    context: PrivacyContext
    head: tuple

    def halves(self, state: tuple) -> tuple[tuple, tuple]:
        """The chain's state as (the first half's, the second half's)."""
        return tuple(state[: self.index]), tuple(state[self.index :])


def split_at_reduce(chain_transform: GradientTransformation) -> Split:
    """Splits a chain, as bound when it was built, at `aggregate()` (see `Split`).

    The train step runs the first half on each micro-batch and sums the results, then the second
    half once per logical batch, so noise and accounting happen once. States and keys of both
    halves match those of the whole chain (`Split.halves`). The first half's `update` does not
    close the batch: call its `finish` (when not None) once per logical batch, after the last
    micro-batch. The second half runs the chain's checks (`budget`) on its new state.
    """
    plan = chain_transform.plan
    bound, context = (plan.bound, plan.context) if plan else bind_parts((chain_transform,))
    reducers = [i for i, part in enumerate(bound) if part.stage == REDUCE]
    if not reducers:
        raise ValueError(
            "the privatizer has no aggregate() step; build it with chain(clip(...), aggregate(), ...)"
        )
    index = reducers[0] + 1
    init, update, finish = _compose(bound[:index], 0, False)
    first = GradientTransformation(init, update, REDUCE, finish=finish)
    second = GradientTransformation(
        *_compose(bound[index:], index, True, context.checks)[:2], AGGREGATE
    )
    return Split(first, second, index, context, bound[:index])


def _compose(
    bound: tuple[GradientTransformation, ...],
    offset: int,
    finish_in_update: bool,
    checks: tuple[Callable[[tuple], None], ...] = (),
):
    def init(params):
        return tuple(part.init(params) for part in bound)

    def update(updates, state, params=None, *, key=None, mask=None):
        if len(state) != len(bound):
            raise ValueError(f"chain state has {len(state)} entries, expected {len(bound)}")
        new_state = []
        for index, (part, part_state) in enumerate(zip(bound, state, strict=True)):
            part_key = None if key is None else fdr.fold_in(key, offset + index)
            updates, part_state = part.update(updates, part_state, params, key=part_key, mask=mask)
            new_state.append(part_state)
        if finish_in_update:
            new_state = finish(tuple(new_state), key=key)
        for check in checks:
            check(tuple(new_state))
        return updates, tuple(new_state)

    def finish(state, *, key=None):
        new_state = list(state)
        for index, part in enumerate(bound):
            if part.finish is not None:
                part_key = None if key is None else fdr.fold_in(key, offset + index)
                new_state[index] = part.finish(state[index], key=part_key)
        return tuple(new_state)

    has_finish = any(part.finish is not None for part in bound)
    return init, update, (finish if has_finish else None)


def _flatten(transforms: tuple[GradientTransformation, ...]) -> tuple[GradientTransformation, ...]:
    parts = []
    for t in transforms:
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain takes GradientTransformations, got {type(t).__name__}")
        parts.extend(t.plan.parts if t.plan else (t,))
    return tuple(parts)


def _stage_of(bound: tuple[GradientTransformation, ...]) -> str:
    stages = {part.stage for part in bound}
    if REDUCE in stages:
        return REDUCE
    return PER_EXAMPLE if PER_EXAMPLE in stages else AGGREGATE

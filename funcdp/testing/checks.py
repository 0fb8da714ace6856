"""Property checks for privacy transforms: declared sensitivity, independence of padding, purity.

Each check runs a hypothesis search (derandomized, so a run is reproducible) and raises
`AssertionError`, with the falsifying example, when the transform breaks its claim.
"""

from __future__ import annotations

import math
from typing import Any

import optree
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from funcdp import random as fdr
from funcdp.testing.strategies import (
    FINITE_ROW_KINDS,
    RELATIONS,
    masks,
    neighbouring_batches,
    param_trees,
    per_example_trees,
)
from funcdp.transforms.aggregation import aggregate
from funcdp.transforms.base import AGGREGATE, PER_EXAMPLE, GradientTransformation, chain
from funcdp.tree import tree_clone

_PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)


def check_sensitivity(
    transform: GradientTransformation,
    *,
    params: Any = None,
    state: Any = None,
    relation: str = "add_remove",
    max_batch: int = 6,
    max_examples: int = 200,
) -> None:
    """Checks that neighbouring batches move the aggregated output by at most the sensitivity.

    The transform (stage "per_example", with a declared `sensitivity` S) is run as
    `chain(transform, aggregate())` on two batches that differ in one example, from the same
    state and key. The L2 distance of the two sums must be at most S for add/remove-one
    neighbours (a real row deleted, masked out as padding, or added) and 2S for replace-one,
    up to floating-point rounding (relative slack 2 B^2 u, u the unit roundoff of the gradient's
    dtype, B the batch size). On every batch it also checks that the output and the new state
    do not change when the padded rows are replaced by other values, NaN and inf included, and
    that the output is finite.

    Args:
      transform: the per-example transform to check.
      params: the parameter tree the gradients are shaped like; None draws mixed trees from
        `param_trees()`; a hypothesis strategy is drawn from.
      state: the transform state to start from; None uses `transform.init(params)`.
      relation: "add_remove" or "replace".
      max_batch: largest batch drawn.
      max_examples: number of hypothesis examples.

    Raises:
      AssertionError: the transform breaks its claim (the message holds the example).
      ValueError: the transform is not a per-example transform with a declared sensitivity.
    """
    if transform.stage != PER_EXAMPLE or transform.sensitivity is None:
        raise ValueError(
            "check_sensitivity needs a per-example transform that declares its sensitivity, got "
            f"stage {transform.stage!r} and sensitivity {transform.sensitivity!r}"
        )
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    summed = chain(transform, aggregate())
    bound = transform.sensitivity * (2.0 if relation == "replace" else 1.0)

    @settings(**_settings(max_examples))
    @given(data=st.data())
    def run(data):
        tree = _draw_params(data, params)
        pair = data.draw(
            neighbouring_batches(
                tree, max_batch=max_batch, relation=relation, real_kinds=FINITE_ROW_KINDS
            )
        )
        start = _start_state(summed, transform, tree, state)
        key = fdr.key(data.draw(st.integers(0, 2**31 - 1), label="key"))
        first, first_state = summed.update(pair.grads, start, tree, key=key, mask=pair.mask)
        second, _ = summed.update(pair.other_grads, start, tree, key=key, mask=pair.other_mask)
        for name, out in (("first", first), ("neighbour", second)):
            assert _all_finite(out), f"the {name} batch's output is not finite: {out}"
        distance = _distance(first, second)
        size = max(pair.mask.shape[0], pair.other_mask.shape[0])
        slack = 2.0 * size * size * _roundoff(pair.grads)
        assert distance <= bound * (1.0 + slack) + 1e-12, (
            f"neighbouring batches ({relation}, row {pair.index}) moved the sum by {distance:.6g}, "
            f"more than the declared bound {bound:.6g}"
        )
        garbage = data.draw(per_example_trees(tree, pair.mask.shape[0]), label="padding")
        keep = pair.mask
        repadded = optree.tree_map(
            lambda g, r: torch.where(keep.reshape((-1,) + (1,) * (g.dim() - 1)), g, r),
            pair.grads,
            garbage,
        )
        again, again_state = summed.update(repadded, start, tree, key=key, mask=keep)
        assert _trees_equal(first, again), "the output depends on the values of padded rows"
        assert _trees_equal(first_state, again_state), "the state depends on padded rows"

    run()


def check_pure(
    transform: GradientTransformation,
    *,
    params: Any = None,
    state: Any = None,
    max_batch: int = 6,
    max_examples: int = 200,
) -> None:
    """Checks that a transform is a pure function of its inputs and key.

    Two calls with equal inputs, state and key must give equal outputs and new states (NaN
    equal to NaN), and neither call may change its inputs (gradients, mask, state, params) in
    place. A transform with a `bind` (noise, accounting) is checked inside `chain(transform)`,
    so pass a whole chain when it needs a clip upstream. Per-example and reducing transforms get
    per-example trees and a mask; aggregate-stage ones get a tree shaped like the parameters.

    Args:
      transform: the transform (or chain) to check.
      params, state, max_batch, max_examples: as in `check_sensitivity`.

    Raises:
      AssertionError: the transform is not pure (the message holds the example).
    """
    bound = chain(transform) if (transform.bind is not None or transform.finish) else transform

    @settings(**_settings(max_examples))
    @given(data=st.data())
    def run(data):
        tree = _draw_params(data, params)
        if bound.stage == AGGREGATE:
            grads = data.draw(per_example_trees(tree, 1, kinds=FINITE_ROW_KINDS))
            grads, mask = optree.tree_map(lambda g: g[0], grads), None
        else:
            size = data.draw(st.integers(1, max_batch), label="batch size")
            mask = data.draw(masks(size))
            grads = data.draw(per_example_trees(tree, size, kinds=FINITE_ROW_KINDS))
        start = (
            _start_state(bound, transform, tree, state)
            if bound is not transform
            else (transform.init(tree) if state is None else state)
        )
        key = fdr.key(data.draw(st.integers(0, 2**31 - 1), label="key"))
        inputs = (grads, start, tree, mask)
        before = tree_clone(inputs)
        first = bound.update(grads, start, tree, key=key, mask=mask)
        assert _trees_equal(inputs, before), "update changed its inputs in place"
        second = bound.update(*tree_clone(before)[:3], key=key.clone(), mask=mask)
        assert _trees_equal(first, second), "equal inputs and key gave different results"

    run()


def _settings(max_examples: int) -> dict[str, Any]:
    return {
        "max_examples": max_examples,
        "derandomize": True,
        "deadline": None,
        "database": None,
        "phases": _PHASES,
        "report_multiple_bugs": False,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }


def _draw_params(data, params):
    if params is None:
        return data.draw(param_trees(), label="params")
    if isinstance(params, st.SearchStrategy):
        return data.draw(params, label="params")
    return params


def _start_state(wrapped, inner, tree, state):
    """The state of `wrapped` (a chain starting with `inner`) with `inner`'s part set to `state`."""
    fresh = wrapped.init(tree)
    if state is None:
        return fresh
    own = tuple(state) if inner.parts else (state,)
    return (*own, *fresh[len(own) :])


def _distance(a, b) -> float:
    squares = [
        (x.to(torch.float64) - y.to(torch.float64)).pow(2).sum()
        for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    ]
    return math.sqrt(float(sum(squares))) if squares else 0.0


def _roundoff(tree) -> float:
    return max(torch.finfo(x.dtype).eps for x in optree.tree_leaves(tree)) / 2.0


def _all_finite(tree) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in optree.tree_leaves(tree))


def _trees_equal(a, b) -> bool:
    leaves_a, spec_a = optree.tree_flatten(a, none_is_leaf=True)
    leaves_b, spec_b = optree.tree_flatten(b, none_is_leaf=True)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if not _tensors_equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _tensors_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        return False
    if not x.is_floating_point():
        return torch.equal(x, y)
    same_nan = torch.equal(x.isnan(), y.isnan())
    return (
        same_nan
        and torch.equal(x.nan_to_num(0.0, 0.0, 0.0), y.nan_to_num(0.0, 0.0, 0.0))
        and (torch.equal(x.isinf() & (x > 0), y.isinf() & (y > 0)))
    )

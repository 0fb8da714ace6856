"""Per-example clipping: bound each example's contribution to the aggregated gradient.

Every scheme here is a factor rule: the engine splits each example's gradient into groups of
leaves (one group for flat clipping), takes the L2 norm of every group, asks the rule for one
factor per example and group, and multiplies. `clip_by(factor_fn, sensitivity)` exposes that
machinery, so a new scheme is a function from norms [B, G] to factors [B, G] plus the L2 bound
it claims; `funcdp.testing.check_sensitivity` checks the claim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import optree
import torch

from funcdp._certify import norms_upper, squares_upper, unit_roundoff, with_margin
from funcdp._checks import check_positive
from funcdp._rules import flat_factors
from funcdp.transforms.base import PER_EXAMPLE, FactorRule, GradientTransformation
from funcdp.tree import per_example_norms, tree_map, upcast_half

FactorFn = Callable[[torch.Tensor], torch.Tensor]
GroupFn = Callable[[str], str]


def clip(max_norm: float) -> GradientTransformation:
    """Scales each example's gradient to L2 norm at most `max_norm` (flat clipping).

    Example i is multiplied by min(1, C / ||g_i||), so ||clipped g_i|| <= C and adding or
    removing one example moves the sum by at most C: the declared sensitivity is C.

    Non-finite examples are the train step's to handle (`make_train_step(on_nonfinite=...)`,
    the one policy): called directly, a NaN example stays NaN, and `aggregate()` with a mask
    drops it only where the mask says so.

    Args:
      max_norm: the clipping norm C.

    Raises:
      ValueError: max_norm is not a finite number > 0.
    """
    check_positive("max_norm", max_norm)
    max_norm = float(max_norm)
    rule = flat_factors(max_norm)

    def update(updates, state, params=None, *, key=None, mask=None):
        del params, key, mask
        norms = per_example_norms(updates)
        return scale_examples(updates, rule(norms)), state

    return GradientTransformation(
        lambda params: (),
        update,
        PER_EXAMPLE,
        sensitivity=max_norm,
        factor_rule=FactorRule(rule),
    )


def clip_by(
    factor_fn: FactorFn,
    sensitivity: float,
    *,
    groups: GroupFn | None = None,
    group_names: tuple[str, ...] | None = None,
) -> GradientTransformation:
    """A clipping transform from a user's factor rule and the sensitivity it claims.

    The engine computes, for each example i and group g of leaves, the norm n[i, g] of the
    example's slice of the group; `factor_fn(n)` returns factors f[i, g] and every leaf of group
    g of example i is multiplied by f[i, g]. The transform declares `sensitivity`: the claim that
    one example's scaled gradient has L2 norm at most that, whatever its gradient, which
    `funcdp.testing.check_sensitivity` tests. Example, a "soft" clip:
    `clip_by(lambda n: C * torch.tanh(n / C) / n.clamp_min(1e-12), sensitivity=C)`.

    Args:
      factor_fn: maps norms [B, G] (float32 or wider, >= 0, inf for overflowing rows) to
        factors [B, G]. It must treat rows independently.
      sensitivity: the L2 bound of one example's contribution the rule guarantees.
      groups: maps a leaf's path ("fc1.weight" for a params dict; path entries joined by ".")
        to its group's name; None puts every leaf in one group (G = 1).
      group_names: the groups' names in column order; default the sorted names `groups` gives.
        A leaf whose group is not listed is an error.

    Raises:
      ValueError: sensitivity is not a finite number > 0 (when built); a leaf in no listed
        group, or factors of the wrong shape (when updated).
    """
    check_positive("sensitivity", sensitivity)
    if not callable(factor_fn):
        raise TypeError(f"factor_fn must be callable, got {type(factor_fn).__name__}")

    def update(updates, state, params=None, *, key=None, mask=None):
        del params, key, mask
        leaves, spec, columns, norms = _grouped(updates, groups, group_names)
        factors = factor_fn(norms)
        if not isinstance(factors, torch.Tensor) or tuple(factors.shape) != tuple(norms.shape):
            raise ValueError(
                f"factor_fn must return a tensor of shape {tuple(norms.shape)} (examples, groups), "
                f"got {getattr(factors, 'shape', type(factors).__name__)}"
            )
        scaled = [
            _scale_leaf(leaf, factors[:, column])
            for leaf, column in zip(leaves, columns, strict=True)
        ]
        return optree.tree_unflatten(spec, scaled), state

    rule = FactorRule(factor_fn, groups, group_names)
    return GradientTransformation(
        lambda params: (), update, PER_EXAMPLE, sensitivity=float(sensitivity), factor_rule=rule
    )


def clip_per_layer(
    max_norms: Mapping[str, float],
    *,
    groups: GroupFn | None = None,
) -> GradientTransformation:
    """Clips each group of leaves (by default each leaf: per-layer clipping) to its own norm.

    Group g of each example is multiplied by min(1, C_g / ||g_g||). The groups are disjoint, so
    one example's contribution has norm at most sqrt(sum_g C_g^2): the declared sensitivity.

    Args:
      max_norms: the threshold C_g of every group, by name. With `groups=None` the names are
        the leaves' paths, so for a params dict they are the parameter names.
      groups: maps a leaf's path to its group's name (e.g. `lambda p: p.split(".")[0]` for one
        group per top-level module); None makes each leaf its own group.

    Raises:
      ValueError: max_norms is empty or holds a value that is not a finite number > 0.
    """
    names, thresholds = _thresholds("max_norms", max_norms)
    sensitivity = math.sqrt(sum(c * c for c in thresholds))
    limits = torch.tensor(thresholds, dtype=torch.float64)

    def factor_fn(norms):
        c = limits.to(norms.device, norms.dtype)
        return c / torch.maximum(norms, c)

    return clip_by(factor_fn, sensitivity, groups=groups or _by_path, group_names=names)


def normalize_per_example(
    max_norm: float | None,
    gamma: float = 0.01,
    *,
    groups: GroupFn | None = None,
    group_norms: Mapping[str, float] | None = None,
) -> GradientTransformation:
    """Automatic clipping (Bu et al. 2023): example i is multiplied by R / (||g_i|| + gamma).

    Every example then has norm R * n / (n + gamma) < R, whatever its gradient, so there is no
    threshold to tune: the declared sensitivity is R. With `group_norms` each group g is scaled
    by R_g / (||g_g|| + gamma) instead, with sensitivity sqrt(sum_g R_g^2).

    Args:
      max_norm: R, the bound on every example's norm (ignored when `group_norms` is given).
      gamma: the stability constant, > 0; it keeps small gradients from being blown up.
      groups: as in `clip_per_layer`, used with `group_norms`.
      group_norms: per-group bounds R_g by name, for the per-layer variant.

    Raises:
      ValueError: max_norm, gamma or a group norm is not a finite number > 0.
    """
    check_positive("gamma", gamma)
    gamma = float(gamma)
    if group_norms is None:
        check_positive("max_norm", max_norm)
        radius = float(max_norm)
        return clip_by(lambda n: radius / (n + gamma), radius)
    names, radii = _thresholds("group_norms", group_norms)
    limits = torch.tensor(radii, dtype=torch.float64)

    def factor_fn(norms):
        return limits.to(norms.device, norms.dtype) / (norms + gamma)

    sensitivity = math.sqrt(sum(r * r for r in radii))
    return clip_by(factor_fn, sensitivity, groups=groups or _by_path, group_names=names)


def scale_examples(updates, factors: torch.Tensor):
    """Multiplies example i of every [B, ...] leaf by factors[i], with the rounding margin.

    `factors` come from upper bounds on the norms; the margin (`funcdp._certify.with_margin`)
    covers the rounding of the products, so a scaled example stays within its bound. Half-
    precision leaves are scaled in float32 and rounded back; `aggregate` sums them in float32.
    """
    return tree_map(lambda leaf: _scale_leaf(leaf, factors), updates)


def leaf_paths(tree) -> list[str]:
    """The path of every leaf of `tree` in optree's order, entries joined by "."."""
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return [".".join(str(entry) for entry in path) for path in paths]


def grouped_norms(
    updates, groups: GroupFn | None = None, group_names: tuple[str, ...] | None = None
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The norms [B, G] that `clip_by` hands its rule, and the group names of the columns."""
    norms = _grouped(updates, groups, group_names)[3]
    return norms, _column_names(updates, groups, group_names)


def _grouped(updates, groups, group_names):
    leaves, spec, columns, squares = group_squares(updates, groups, group_names)
    return leaves, spec, columns, norms_upper(squares, len(leaves), leaves)


def group_squares(updates, groups: GroupFn | None, group_names: tuple[str, ...] | None):
    """The leaves of per-example `updates`, their tree spec, each leaf's group column, and the
    float64 upper bounds [B, G] of each example's squared norm in each group (`norms_upper`
    turns them into norms)."""
    leaves, spec = optree.tree_flatten(updates)
    if not leaves:
        raise ValueError("clipping needs a tree with at least one leaf")
    names = _column_names(updates, groups, group_names)
    if groups is None:
        columns = [0] * len(leaves)
    else:
        index = {name: i for i, name in enumerate(names)}
        columns = []
        for path in leaf_paths(updates):
            name = groups(path)
            if name not in index:
                raise ValueError(f"leaf {path!r} is in group {name!r}, which is not one of {names}")
            columns.append(index[name])
    squares = torch.zeros(
        (leaves[0].shape[0], len(names)), dtype=torch.float64, device=leaves[0].device
    )
    for leaf, column in zip(leaves, columns, strict=True):
        squares[:, column] += squares_upper(leaf.reshape(leaf.shape[0], -1))
    return leaves, spec, columns, squares


def _column_names(updates, groups, group_names) -> tuple[str, ...]:
    if group_names is not None:
        return tuple(group_names)
    if groups is None:
        return ("all",)
    return tuple(sorted({groups(path) for path in leaf_paths(updates)}))


def _scale_leaf(leaf: torch.Tensor, factors: torch.Tensor):
    """The scaled leaf in its own dtype; half precision is scaled in float32 and rounded back,
    which the margin (in units of the leaf's own roundoff) covers."""
    wide = upcast_half(leaf)
    factors = with_margin(factors, unit_roundoff(leaf.dtype)).to(wide.dtype)
    shaped = factors.reshape((-1,) + (1,) * (leaf.dim() - 1))
    return (wide * shaped).to(leaf.dtype)


def _by_path(path: str) -> str:
    return path


def _thresholds(argument: str, values: Mapping[str, float]) -> tuple[tuple[str, ...], list[float]]:
    if not isinstance(values, Mapping) or not values:
        raise ValueError(
            f"{argument} must be a non-empty mapping from group name to norm, got {values!r}"
        )
    names = tuple(sorted(values))
    for name in names:
        check_positive(f"{argument}[{name!r}]", values[name])
    return names, [float(values[name]) for name in names]

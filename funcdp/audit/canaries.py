"""Canaries for white-box audits: gradients on coordinates the model does not use.

A Dirac canary is a per-example gradient equal to `norm` on one coordinate of the flattened
parameters and zero elsewhere. Put on coordinates that no real example touches (padding
parameters appended to the model's tree), canaries do not interact with the data, so the
privatized update on a canary's coordinate carries exactly that canary's signal plus the noise:
the strongest white-box test of the clipping, noise and accounting code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from funcdp import random as fdr
from funcdp.data import IndexBatch, poisson_batches
from funcdp.tree import tree_flatten, tree_leaves, tree_unflatten

CANARY_PARAMETER = "audit_canaries"


def num_coordinates(params: Any) -> int:
    """The number of scalars in the tree `params`."""
    return sum(leaf.numel() for leaf in tree_leaves(params))


def flatten(tree: Any) -> torch.Tensor:
    """All leaves of `tree` concatenated into one float64 vector, in optree's leaf order."""
    leaves = tree_leaves(tree)
    return torch.cat([leaf.detach().reshape(-1).to(torch.float64) for leaf in leaves])


def dirac_canary_grads(params: Any, coordinates: torch.Tensor, norm: float) -> Any:
    """Per-example gradients shaped like `params` with a leading batch dimension.

    Row b is `norm` on flattened coordinate `coordinates[b]` and zero elsewhere, so each row
    has L2 norm exactly `norm`.

    Args:
      params: the parameter tree (only shapes, dtypes and devices are read).
      coordinates: long tensor [B] of flattened coordinates.
      norm: the canary's L2 norm.
    """
    leaves, spec = tree_flatten(params)
    size = coordinates.shape[0]
    rows = torch.arange(size)
    out, offset = [], 0
    for leaf in leaves:
        width = leaf.numel()
        flat = torch.zeros(size, width, dtype=leaf.dtype, device=leaf.device)
        local = coordinates - offset
        here = (local >= 0) & (local < width)
        flat[rows[here], local[here].to(flat.device)] = norm
        out.append(flat.reshape((size, *leaf.shape)))
        offset += width
    return tree_unflatten(spec, out)


def draw_included(key: torch.Tensor, num_canaries: int) -> torch.Tensor:
    """Which canaries join the run: independent fair coins from `key`, a bool tensor [m]."""
    return fdr.uniform(key, (num_canaries,)) < 0.5


def canary_batches(
    num_examples: int, sample_rate: float, *, key: torch.Tensor, steps: int
) -> Iterator[IndexBatch]:
    """Poisson batches over the included canaries, through `funcdp.data.poisson_batches`.

    With no canary included (probability 2^-m) each step is one padding row with mask false,
    which the chain still noises and accounts.
    """
    if num_examples > 0:
        yield from poisson_batches(num_examples, sample_rate, key=key, steps=steps)
        return
    for _ in range(steps):
        yield IndexBatch(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool))


def with_canary_parameter(
    params: dict[str, torch.Tensor], num_canaries: int
) -> dict[str, torch.Tensor]:
    """`params` plus a zero vector of `num_canaries` padding coordinates the model never reads.

    The padding is stored under the name `CANARY_PARAMETER`; strip it before calling the model
    (`without_canary_parameter`).
    """
    if CANARY_PARAMETER in params:
        raise ValueError(f"params already has an entry named {CANARY_PARAMETER!r}")
    if not isinstance(num_canaries, int) or num_canaries < 1:
        raise ValueError(f"num_canaries must be a positive int, got {num_canaries!r}")
    some = next(iter(params.values()))
    padding = torch.zeros(num_canaries, dtype=some.dtype, device=some.device)
    return {**params, CANARY_PARAMETER: padding}


def without_canary_parameter(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`params` without the padding added by `with_canary_parameter`."""
    return {name: value for name, value in params.items() if name != CANARY_PARAMETER}


def check_canary_norm(canary_norm: float) -> float:
    """Raises unless canary_norm is a finite number > 0; returns it as a float."""
    if (
        not isinstance(canary_norm, (int, float))
        or isinstance(canary_norm, bool)
        or not 0.0 < canary_norm < math.inf
    ):
        raise ValueError(f"canary_norm must be a finite number > 0, got {canary_norm!r}")
    return float(canary_norm)

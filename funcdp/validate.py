"""Find what in a module breaks differential privacy or vmap, and repair it."""

from __future__ import annotations

import copy
import logging
import math
from typing import NamedTuple

from torch import nn

logger = logging.getLogger(__name__)


class Finding(NamedTuple):
    """One problem in a module: where it is, what is wrong, and how to repair it."""

    submodule: str
    problem: str
    fix: str


def validate(module: nn.Module) -> list[Finding]:
    """Lists the submodules that break per-example privacy; an empty list means none were found.

    This first version knows batch normalization, which mixes the examples of a batch (a
    fuller validator for layers without batching rules is tracked separately).
    """
    findings = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            findings.append(
                Finding(
                    submodule=name or type(module).__name__,
                    problem=f"{type(sub).__name__} mixes the examples of a batch through its "
                    "batch statistics, so per-example clipping does not bound one example's influence",
                    fix="replace it with GroupNorm (funcdp.fix does this)",
                )
            )
    return findings


def fix(module: nn.Module) -> nn.Module:
    """A repaired copy of `module`: every BatchNorm becomes a GroupNorm over the same channels.

    The group count is the largest divisor of the channel count that is at most 32. Each
    replacement is logged at WARNING level, since it changes the function the module computes.
    """
    repaired = copy.deepcopy(module)
    for name, sub in list(repaired.named_modules()):
        for child_name, child in list(sub.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                channels = child.num_features
                groups = math.gcd(32, channels)
                norm = nn.GroupNorm(groups, channels, eps=child.eps, affine=child.affine)
                setattr(sub, child_name, norm)
                where = f"{name}.{child_name}" if name else child_name
                logger.warning(
                    "funcdp.fix: replaced %s '%s' by GroupNorm(%d, %d)",
                    type(child).__name__, where, groups, channels,
                )
    return repaired

"""Correlated noise by matrix factorization: BandMF, BLT and the binary tree.

`banded(steps, bands)`, `blt(steps, buffers)` and `tree(steps)` build strategies (plain data)
that `funcdp.correlated_noise(noise_multiplier, strategy)` turns into a transform;
`choose_strategy(...)` picks, among candidates (BandMF with 1 band, DP-SGD, and more), the one
whose noise calibrated to a target epsilon has the smallest prefix-sum error.
"""

from funcdp.mf.accounting import mechanism
from funcdp.mf.builders import banded, blt, tree
from funcdp.mf.choose import Choice, choose_strategy, default_candidates, prefix_sum_error
from funcdp.mf.strategies import BandedStrategy, BltStrategy, Strategy, TreeStrategy

__all__ = [
    "BandedStrategy",
    "BltStrategy",
    "Choice",
    "Strategy",
    "TreeStrategy",
    "banded",
    "blt",
    "choose_strategy",
    "default_candidates",
    "mechanism",
    "prefix_sum_error",
    "tree",
]

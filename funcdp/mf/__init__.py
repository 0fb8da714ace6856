"""Correlated noise by matrix factorization: BandMF, BLT and the binary tree.

`banded(steps, bands)`, `blt(steps, buffers)` and `tree(steps)` build strategies (plain data)
that `funcdp.correlated_noise(noise_multiplier, strategy)` turns into a transform.
"""

from funcdp.mf.accounting import mechanism
from funcdp.mf.builders import banded, blt, tree
from funcdp.mf.strategies import BandedStrategy, BltStrategy, Strategy, TreeStrategy

__all__ = [
    "BandedStrategy",
    "BltStrategy",
    "Strategy",
    "TreeStrategy",
    "banded",
    "blt",
    "mechanism",
    "tree",
]

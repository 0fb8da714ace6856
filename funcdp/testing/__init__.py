"""Property-testing kit for privacy transforms: hypothesis strategies and checks.

`check_sensitivity(transform)` tests a clipping scheme's declared sensitivity on neighbouring
batches (and that padding does not matter); `check_pure(transform)` tests that equal inputs and
key give equal results and that nothing is changed in place. The strategies build parameter
trees, per-example gradients with huge, tiny, zero and non-finite rows, masks and neighbouring
batches for users' own properties.
"""

from funcdp.testing.checks import check_pure, check_sensitivity
from funcdp.testing.strategies import (
    DTYPES,
    ROW_KINDS,
    Neighbours,
    masks,
    neighbouring_batches,
    param_trees,
    per_example_trees,
)

__all__ = [
    "DTYPES",
    "ROW_KINDS",
    "Neighbours",
    "check_pure",
    "check_sensitivity",
    "masks",
    "neighbouring_batches",
    "param_trees",
    "per_example_trees",
]

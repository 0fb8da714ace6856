"""Property-testing kit for privacy transforms: hypothesis strategies and checks.

`check_sensitivity(transform)` tests a clipping scheme's declared sensitivity on neighbouring
batches (and that padding does not matter); `check_pure(transform)` tests that equal inputs and
key give equal results and that nothing is changed in place; `check_engine_sensitivity` runs the
clipping engines themselves (vmap, ghost, two-pass) on adversarial examples
(`sequence_examples`: large common input parts, cancelling output gradients). The strategies build parameter
trees, per-example gradients with huge, tiny, zero and non-finite rows, masks and neighbouring
batches for users' own properties.
"""

from funcdp.testing.checks import check_pure, check_sensitivity
from funcdp.testing.engines import Problem, check_engine_sensitivity, sequence_examples
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
    "Problem",
    "check_engine_sensitivity",
    "check_pure",
    "check_sensitivity",
    "masks",
    "neighbouring_batches",
    "param_trees",
    "per_example_trees",
    "sequence_examples",
]

"""funcdp: a functional differential-privacy engine for PyTorch.

Any `nn.Module` becomes a pure function (`functionalize`); per-example gradients are
`vmap(grad(loss))`; clipping, aggregation, noise, normalization and accounting are composable
transforms (`chain`); a train step is a pure function of one state pytree.
"""

import torch as _torch

from funcdp import accounting, data, federated, memory, mf, nn, optim, random, transforms, tree
from funcdp._engines import ClippedSum, clipped_sum
from funcdp.accounting import (
    Ledger,
    LedgerRecord,
    Mechanism,
    calibrate_noise,
    dpsgd_epsilon,
    epsilon,
)
from funcdp.data import (
    Batch,
    IndexBatch,
    PoissonLoader,
    UserIndexBatch,
    UserLoader,
    balls_in_bins_batches,
    cyclic_poisson_batches,
    poisson_batches,
    shuffled_batches,
    user_batches,
)
from funcdp.explain import Explanation, explain, format_explanations
from funcdp.functional import functionalize, to_module
from funcdp.memory import AutoChunk
from funcdp.per_sample import (
    per_sample_grads,
    per_sample_grads_and_losses,
    per_sample_norms,
)
from funcdp.performance import Performance
from funcdp.train import NonFiniteError, TrainState, make_eval_step, make_train_step
from funcdp.transforms import (
    AccountState,
    AdaptiveClipState,
    BudgetExceededError,
    CorrelatedNoiseState,
    GradientTransformation,
    account,
    adaptive_clip,
    aggregate,
    budget,
    chain,
    clip,
    clip_by,
    clip_per_layer,
    correlated_noise,
    gaussian_noise,
    gradient_noise_multiplier,
    identity,
    normalize,
    normalize_per_example,
)
from funcdp.validate import (
    Change,
    Finding,
    UnsupportedModuleError,
    check_supported,
    fix,
    validate,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    """`funcdp.audit`, `funcdp.testing` and `funcdp.hf` load on first use (testing needs
    hypothesis; hf needs transformers and peft, the `hf` extra)."""
    if name in ("audit", "testing", "hf"):
        import importlib

        return importlib.import_module(f"funcdp.{name}")
    raise AttributeError(f"module 'funcdp' has no attribute {name!r}")


# Let `torch.load` (weights_only, the default) read a saved TrainState.
_torch.serialization.add_safe_globals(
    [
        TrainState,
        Ledger,
        LedgerRecord,
        AccountState,
        AdaptiveClipState,
        CorrelatedNoiseState,
        optim.SgdState,
        optim.AdamState,
        optim.TorchOptimizerState,
    ]
)

__all__ = [
    "AccountState",
    "AdaptiveClipState",
    "AutoChunk",
    "Batch",
    "BudgetExceededError",
    "Change",
    "ClippedSum",
    "CorrelatedNoiseState",
    "Explanation",
    "Finding",
    "GradientTransformation",
    "IndexBatch",
    "Ledger",
    "LedgerRecord",
    "Mechanism",
    "NonFiniteError",
    "Performance",
    "PoissonLoader",
    "TrainState",
    "UnsupportedModuleError",
    "UserIndexBatch",
    "UserLoader",
    "account",
    "accounting",
    "audit",
    "adaptive_clip",
    "aggregate",
    "balls_in_bins_batches",
    "budget",
    "calibrate_noise",
    "chain",
    "check_supported",
    "clip",
    "clip_by",
    "clip_per_layer",
    "clipped_sum",
    "correlated_noise",
    "cyclic_poisson_batches",
    "data",
    "dpsgd_epsilon",
    "epsilon",
    "explain",
    "federated",
    "fix",
    "format_explanations",
    "functionalize",
    "gaussian_noise",
    "gradient_noise_multiplier",
    "hf",
    "identity",
    "make_eval_step",
    "make_train_step",
    "memory",
    "mf",
    "nn",
    "normalize",
    "normalize_per_example",
    "optim",
    "per_sample_grads",
    "per_sample_grads_and_losses",
    "per_sample_norms",
    "poisson_batches",
    "random",
    "shuffled_batches",
    "testing",
    "to_module",
    "transforms",
    "tree",
    "user_batches",
    "validate",
]

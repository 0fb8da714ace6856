"""Composable privacy transforms: clip, aggregate, noise, normalize, account."""

from funcdp.transforms.accounting import (
    AccountState,
    BudgetExceededError,
    BudgetState,
    account,
    budget,
)
from funcdp.transforms.aggregation import aggregate
from funcdp.transforms.base import (
    AGGREGATE,
    PER_EXAMPLE,
    REDUCE,
    GradientTransformation,
    PrivacyContext,
    chain,
    identity,
)
from funcdp.transforms.clipping import clip
from funcdp.transforms.noise import gaussian_noise
from funcdp.transforms.normalization import normalize

__all__ = [
    "AGGREGATE",
    "PER_EXAMPLE",
    "REDUCE",
    "AccountState",
    "BudgetExceededError",
    "BudgetState",
    "GradientTransformation",
    "PrivacyContext",
    "account",
    "aggregate",
    "budget",
    "chain",
    "clip",
    "gaussian_noise",
    "identity",
    "normalize",
]

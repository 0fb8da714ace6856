"""Composable privacy transforms: clip, aggregate, noise, normalize, account."""

from funcdp.transforms.accounting import (
    AccountState,
    BudgetExceededError,
    account,
    budget,
)
from funcdp.transforms.adaptive_clipping import AdaptiveClipState, adaptive_clip
from funcdp.transforms.aggregation import aggregate
from funcdp.transforms.base import (
    AGGREGATE,
    PER_EXAMPLE,
    REDUCE,
    FactorRule,
    GradientTransformation,
    PrivacyContext,
    chain,
    identity,
)
from funcdp.transforms.clipping import (
    clip,
    clip_by,
    clip_per_layer,
    flat_factors,
    normalize_per_example,
)
from funcdp.transforms.correlated_noise import CorrelatedNoiseState, correlated_noise
from funcdp.transforms.noise import gaussian_noise, gradient_noise_multiplier
from funcdp.transforms.normalization import normalize

__all__ = [
    "AGGREGATE",
    "PER_EXAMPLE",
    "REDUCE",
    "AccountState",
    "AdaptiveClipState",
    "BudgetExceededError",
    "CorrelatedNoiseState",
    "FactorRule",
    "GradientTransformation",
    "PrivacyContext",
    "account",
    "adaptive_clip",
    "aggregate",
    "budget",
    "chain",
    "clip",
    "clip_by",
    "clip_per_layer",
    "correlated_noise",
    "flat_factors",
    "gaussian_noise",
    "gradient_noise_multiplier",
    "identity",
    "normalize",
    "normalize_per_example",
]

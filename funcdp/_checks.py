"""Argument checks shared across modules; each error names the argument, value and range."""

from __future__ import annotations

import math

import torch


def check_sample_rate(sample_rate: float) -> None:
    """Raises unless 0 < sample_rate <= 1."""
    if not _is_real(sample_rate) or not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")


def check_noise_multiplier(noise_multiplier: float) -> None:
    """Raises unless noise_multiplier is a finite number >= 0."""
    if not _is_real(noise_multiplier) or not 0.0 <= noise_multiplier < math.inf:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


def check_delta(delta: float, *, allow_zero: bool = False) -> None:
    """Raises unless 0 < delta < 1, or 0 <= delta < 1 with `allow_zero` (pure DP)."""
    if not _is_real(delta) or not 0.0 <= delta < 1.0 or (delta == 0.0 and not allow_zero):
        raise ValueError(f"delta must be in {'[0' if allow_zero else '(0'}, 1), got {delta!r}")


def check_positive(name: str, value: float) -> None:
    """Raises unless value is a finite number > 0."""
    if not _is_real(value) or not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_mask(mask: torch.Tensor, batch_size: int) -> None:
    """Raises unless `mask` is a bool tensor of shape [batch_size]."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {_describe(mask)}")
    if tuple(mask.shape) != (batch_size,):
        raise ValueError(
            f"mask must have shape ({batch_size},) to fit a batch of {batch_size} rows, "
            f"got shape {tuple(mask.shape)}"
        )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

"""Saving what DP training changed: a peft model's adapter alone."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from funcdp.functional import to_module


def save_adapter(model: nn.Module, state: Any, directory: str | os.PathLike) -> nn.Module:
    """Writes the trained adapter of a peft `model` to `directory` with `save_pretrained`.

    The model is not modified: `funcdp.to_module(model, state)` builds a trained copy, and peft
    saves that copy's adapter weights and config (not the frozen base model). Reload with
    `peft.PeftModel.from_pretrained(base_model, directory)`.

    Returns:
      The trained copy.

    Raises:
      TypeError: `model` is not a peft model.
    """
    try:
        from peft import PeftModel
    except ImportError as error:  # pragma: no cover - peft is part of the hf extra
        raise ImportError("save_adapter needs peft: pip install 'funcdp[hf]'") from error
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"model must be a peft.PeftModel to save an adapter, got {type(model).__name__}; "
            "save a fully fine-tuned model with funcdp.to_module(model, state).save_pretrained(...)"
        )
    trained = to_module(model, state)
    trained.save_pretrained(os.fspath(directory))
    return trained

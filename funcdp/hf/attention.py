"""HF attention that runs under `vmap`: the same function as "sdpa" (HF's default) and "eager".

Why HF's defaults fail under `vmap(grad(loss))` over examples:
- mask building reads the data: `transformers.masking_utils` skips building a mask when no token
  is padded (`_ignore_causal_mask_sdpa`: `padding_mask is None or fast_all(padding_mask)`;
  `_ignore_bidirectional_mask_sdpa`: `padding_mask.all()`), a Python branch on a tensor's value,
  which `vmap` refuses ("data-dependent control flow"). `is_tracing` guards these checks against
  compile and jit, not against `vmap`.
- on CPU, `F.scaled_dot_product_attention` with a mask runs the fused
  `_scaled_dot_product_flash_attention_for_cpu`, which has no batching rule: `vmap` falls back
  to a slow loop over examples.

`vmap_attention(model)` switches, while a block runs, every config of the model whose
implementation is "sdpa" to "funcdp_sdpa" and "eager" to "funcdp_eager", both registered with
HF's `AttentionInterface` and `AttentionMaskInterface`: the mask is always built (never skipped,
which changes no result: the skip only picks `is_causal=True` where the built mask is causal),
and "funcdp_sdpa" runs HF's own `sdpa_attention_forward` with torch's scaled-dot-product kernel
replaced by its math (`softmax(q k^T * scale + mask) v`, rows with no visible key give 0 as
torch's kernel does). Outputs equal HF's default to float rounding (tests: 1e-5). The model's
config is restored after the block, so a saved model names its own implementation. Attention
dropout draws differently from torch's fused kernel (same distribution).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

VMAP_SDPA, VMAP_EAGER = "funcdp_sdpa", "funcdp_eager"
SWITCH = {"sdpa": VMAP_SDPA, "eager": VMAP_EAGER}


def math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` as matmuls and a softmax, which `vmap` batches.

    A query row whose keys are all masked gives 0 (torch's kernels do the same), with a zero
    gradient: the masked scores are filled with the dtype's lowest finite value, not -inf,
    so no NaN enters the backward.
    """
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeats, dim=-3)
        value = value.repeat_interleave(repeats, dim=-3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        attn_mask = torch.ones(
            query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device
        ).tril()
    visible = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        lowest = torch.finfo(scores.dtype).min
        scores = torch.where(attn_mask, scores, torch.full((), lowest, dtype=scores.dtype))
        visible = attn_mask.any(-1, keepdim=True)
    elif attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if visible is not None:
        weights = torch.where(visible, weights, torch.zeros((), dtype=weights.dtype))
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ value


class _MathAttention(TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` to `math_attention` while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return math_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _vmap_sdpa_forward(module: nn.Module, *args, **kwargs):
    """HF's sdpa attention with torch's fused kernel replaced by its math."""
    with _MathAttention():
        return sdpa_attention_forward(module, *args, **kwargs)


def _vmap_eager_forward(module: nn.Module, *args, **kwargs):
    """The eager attention of the module's own modeling file (HF defines one per model)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(
            f"funcdp_eager: {type(module).__module__} defines no eager_attention_forward; load "
            'the model with attn_implementation="sdpa" (the default) instead'
        )
    return eager(module, *args, **kwargs)


def _built(mask_fn):
    """A mask function that always builds the mask (its skips read the data)."""

    def build(*args, **kwargs):
        kwargs["allow_is_causal_skip"] = False
        kwargs["allow_is_bidirectional_skip"] = False
        return mask_fn(*args, **kwargs)

    return build


AttentionInterface.register(VMAP_SDPA, _vmap_sdpa_forward)
AttentionInterface.register(VMAP_EAGER, _vmap_eager_forward)
AttentionMaskInterface.register(VMAP_SDPA, _built(sdpa_mask))
AttentionMaskInterface.register(VMAP_EAGER, _built(eager_mask))


def model_configs(model: nn.Module) -> list:
    """Every distinct HF config held by the model's submodules, sub-configs included.

    Distinct by `is`, not `id()`: a compiled step traces this (the loss switches attention
    inside it), and dynamo fails on `id()` of a config."""
    found: list = []
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if not hasattr(config, "_attn_implementation"):
            continue
        children = (
            getattr(config, name, None) for name in getattr(config, "sub_configs", {}) or {}
        )
        for each in (config, *children):
            if hasattr(each, "_attn_implementation") and not any(each is seen for seen in found):
                found.append(each)
    return found


def unsupported_implementations(model: nn.Module) -> list[str]:
    """The attention implementations in `model` that `vmap_attention` cannot switch."""
    names = {config._attn_implementation for config in model_configs(model)}
    return sorted(
        n for n in names if n is not None and n not in SWITCH and n not in SWITCH.values()
    )


@contextlib.contextmanager
def vmap_attention(model: nn.Module) -> Iterator[None]:
    """While the block runs, "sdpa" and "eager" attention in `model` run their vmap versions."""
    switched = []
    for config in model_configs(model):
        current = config._attn_implementation
        if current in SWITCH:
            switched.append((config, current))
            config._attn_implementation_internal = SWITCH[current]
    try:
        yield
    finally:
        for config, current in switched:
            config._attn_implementation_internal = current

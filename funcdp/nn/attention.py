"""Attention written with explicit matmul and softmax, so `vmap` batches it on every device.

On CPU, `torch.nn.functional.scaled_dot_product_attention` dispatches to
`_scaled_dot_product_flash_attention_for_cpu`, which has no batching rule: under `vmap` it falls
back to a per-example loop. `torch.nn.MultiheadAttention` takes that path when called with
`need_weights=False`, as `TransformerEncoderLayer` and `TransformerDecoderLayer` do; and in eval
mode without gradients `TransformerEncoderLayer` takes the fused `_transformer_encoder_layer_fwd`,
which has no batching rule either.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """`softmax(q k^T * scale + mask) v`, the math of `F.scaled_dot_product_attention`.

    Args:
      query: [..., L, E]. key: [..., S, E]. value: [..., S, Ev].
      attn_mask: bool (True: may attend) or float (added to the scores), broadcastable to
        [..., L, S].
      dropout_p: dropout on the attention weights (applied whenever it is > 0, as torch does).
      is_causal: attend only to positions <= the query's (top-left aligned, as torch does).
      scale: defaults to 1 / sqrt(E).

    Returns:
      [..., L, Ev].
    """
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        length, source = query.shape[-2], key.shape[-2]
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, training=True)
    return weights @ value


class MultiheadAttention(nn.MultiheadAttention):
    """`torch.nn.MultiheadAttention` that always takes the explicit attention path.

    Same constructor, parameters and `state_dict` as torch's; `forward` has the same signature
    and returns the same values, but never dispatches to the fused kernels that `vmap` cannot
    batch (it computes the attention weights even when `need_weights=False`, then drops them).
    """

    def forward(  # noqa: D102
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            length, source = (
                query.shape[-2 if self.batch_first else 0],
                key.shape[-2 if self.batch_first else 0],
            )
            attn_mask = (
                torch.ones(length, source, dtype=torch.bool, device=query.device)
                .tril()
                .logical_not()
            )
        if self._plain_self_attention(query, key, value, key_padding_mask, attn_mask):
            x = query.transpose(0, 1) if self.batch_first and query.dim() == 3 else query
            out, weights = self._self_attention(
                x, key_padding_mask, attn_mask, average_attn_weights
            )
            if self.batch_first and out.dim() == 3:
                out = out.transpose(0, 1)
            return out, (weights if need_weights else None)
        if self.batch_first and query.dim() == 3:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=self.q_proj_weight if separate else None,
            k_proj_weight=self.k_proj_weight if separate else None,
            v_proj_weight=self.v_proj_weight if separate else None,
            average_attn_weights=average_attn_weights,
        )
        if self.batch_first and out.dim() == 3:
            out = out.transpose(0, 1)
        return out, (weights if need_weights else None)

    def _plain_self_attention(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Self-attention with packed projections and no extra key/value rows or odd masks."""
        batched = query.dim() == 3
        return (
            query is key is value
            and self._qkv_same_embed_dim
            and self.bias_k is None
            and not self.add_zero_attn
            and (attn_mask is None or attn_mask.dim() in (2, 3))
            and (key_padding_mask is None or key_padding_mask.dim() == (2 if batched else 1))
        )

    def _self_attention(self, x, key_padding_mask, attn_mask, average):
        """torch's attention math, with each projection one `F.linear` of its own parameter.

        `F.multi_head_attention_forward` reads the projection weights inside one opaque call;
        here ghost clipping sees each weight used once, as a linear layer's, and clips it
        without per-example gradients.
        """
        unbatched = x.dim() == 2
        if unbatched:  # [L, E] -> [L, 1, E], as torch does
            x = x.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        length, batch, embed = x.shape
        heads = self.num_heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
        q, k, v = (t.reshape(length, batch * heads, -1).transpose(0, 1) for t in (q, k, v))
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, length)
            padding = padding.expand(-1, heads, -1, -1).reshape(batch * heads, 1, length)
            mask = padding if mask is None else mask + padding
        scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(1, 2)
        weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (weights @ v).transpose(0, 1).reshape(length * batch, embed)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(length, batch, embed)
        weights = weights.view(batch, heads, length, length)
        if average:
            weights = weights.mean(dim=1)
        if unbatched:
            return out.squeeze(1), weights.squeeze(0)
        return out, weights

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """A copy of a `torch.nn.MultiheadAttention` (same weights, config and mode)."""
        reference = module.out_proj.weight
        new = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device=reference.device,
            dtype=reference.dtype,
        )
        new.load_state_dict(module.state_dict())
        _copy_requires_grad(module, new)
        return new.train(module.training)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """torch's attention-mask convention: bool True masks out (-inf); a float mask is added."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


def _copy_requires_grad(source: nn.Module, target: nn.Module) -> None:
    for name, p in source.named_parameters():
        target.get_parameter(name).requires_grad_(p.requires_grad)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """`torch.nn.TransformerEncoderLayer` that never takes torch's fused inference fast path.

    In eval mode without gradients torch runs the whole layer as one fused kernel, which `vmap`
    cannot batch (evaluation under `vmap` then loops over examples); this layer always runs the
    plain submodules (use `funcdp.nn.MultiheadAttention` as its `self_attn`, as `funcdp.fix`
    does). Same constructor, parameters and `state_dict`.
    """

    def forward(  # noqa: D102
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoderLayer) -> TransformerEncoderLayer:
        """A copy of a `torch.nn.TransformerEncoderLayer` (same submodules, weights and mode)."""
        new = copy.deepcopy(module)
        new.__class__ = cls  # adds no state: only `forward` differs
        return new

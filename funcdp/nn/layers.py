"""`Bilinear` and `EmbeddingBag` written with ops that `vmap` batches.

torch's `Bilinear` calls `aten::_trilinear` and `EmbeddingBag` calls `aten::_embedding_bag`;
neither has a batching rule, so under `vmap` both fall back to a per-example loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class Bilinear(nn.Bilinear):
    """`torch.nn.Bilinear` (`y = x1^T A x2 + b`) computed with `einsum`; same `state_dict`."""

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:  # noqa: D102
        out = torch.einsum("...i,oij,...j->...o", input1, self.weight, input2)
        return out if self.bias is None else out + self.bias

    @classmethod
    def from_torch(cls, module: nn.Bilinear) -> Bilinear:
        """A copy of a `torch.nn.Bilinear` (same weights and mode)."""
        new = cls(
            module.in1_features,
            module.in2_features,
            module.out_features,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        new.load_state_dict(module.state_dict())
        return _same_flags(module, new)


class EmbeddingBag(nn.EmbeddingBag):
    """`torch.nn.EmbeddingBag` computed with gather and segment sums; same `state_dict`.

    Supports modes "sum", "mean" and "max", 2-D input (one bag per row) and 1-D input with
    `offsets` (`include_last_offset` too), `per_sample_weights` (mode "sum") and `padding_idx`
    (those entries are left out of their bag). An empty bag gives zeros, as in torch.

    Raises:
      ValueError: at construction, for `max_norm` (it rewrites the weight in place during the
        forward pass) or `sparse=True` (per-example gradients are dense).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.max_norm is not None:
            raise ValueError(
                f"max_norm must be None for funcdp.nn.EmbeddingBag, got {self.max_norm!r}: it "
                "renormalizes the weight in place, which a functional forward cannot do"
            )
        if self.sparse:
            raise ValueError("sparse must be False for funcdp.nn.EmbeddingBag, got True")

    def forward(  # noqa: D102
        self,
        input: Tensor,
        offsets: Tensor | None = None,
        per_sample_weights: Tensor | None = None,
    ) -> Tensor:
        if per_sample_weights is not None and self.mode != "sum":
            raise ValueError(f'per_sample_weights needs mode "sum", got mode {self.mode!r}')
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D (one bag per row)")
            return self._bags_2d(input, per_sample_weights)
        if input.dim() != 1 or offsets is None or offsets.dim() != 1:
            raise ValueError(
                f"input must be 2-D, or 1-D with 1-D offsets; got input of shape {tuple(input.shape)}"
            )
        return self._bags_1d(input, offsets, per_sample_weights)

    def _keep(self, input: Tensor) -> Tensor:
        if self.padding_idx is None:
            return torch.ones_like(input, dtype=torch.bool)
        return input != self.padding_idx

    def _bags_2d(self, input: Tensor, weights: Tensor | None) -> Tensor:
        rows = F.embedding(input, self.weight)  # [N, L, D]
        keep = self._keep(input).unsqueeze(-1)
        if self.mode == "max":
            filled = rows.masked_fill(~keep, float("-inf")).amax(1)
            return torch.where(keep.any(1), filled, torch.zeros_like(filled))
        if weights is not None:
            rows = rows * weights.unsqueeze(-1)
        total = (rows * keep).sum(1)
        if self.mode == "sum":
            return total
        return total / keep.sum(1).clamp(min=1)

    def _bags_1d(self, input: Tensor, offsets: Tensor, weights: Tensor | None) -> Tensor:
        num_bags = offsets.shape[0] - 1 if self.include_last_offset else offsets.shape[0]
        starts = offsets[:num_bags]
        positions = torch.arange(input.shape[0], device=input.device)
        bag = torch.searchsorted(starts, positions, right=True) - 1  # bag of each entry
        if self.include_last_offset:  # entries past the last offset belong to no bag
            bag = torch.where(positions < offsets[-1], bag, num_bags)
        keep = self._keep(input)
        bag = torch.where(keep, bag, num_bags)  # a spare row collects what is left out
        rows = F.embedding(input, self.weight)
        size = (num_bags + 1, rows.shape[-1])
        index = bag.unsqueeze(-1).expand_as(rows)
        if self.mode == "max":
            out = rows.new_full(size, float("-inf")).scatter_reduce(0, index, rows, "amax")
            out = out[:num_bags]
            return torch.where(torch.isinf(out) & (out < 0), torch.zeros_like(out), out)
        if weights is not None:
            rows = rows * weights.unsqueeze(-1)
        total = rows.new_zeros(size).scatter_add(0, index, rows)[:num_bags]
        if self.mode == "sum":
            return total
        counts = torch.zeros(num_bags + 1, device=rows.device, dtype=rows.dtype)
        counts = counts.scatter_add(0, bag, torch.ones_like(bag, dtype=rows.dtype))[:num_bags]
        return total / counts.clamp(min=1).unsqueeze(-1)

    @classmethod
    def from_torch(cls, module: nn.EmbeddingBag) -> EmbeddingBag:
        """A copy of a `torch.nn.EmbeddingBag` (same weights, config and mode)."""
        new = cls(
            module.num_embeddings,
            module.embedding_dim,
            max_norm=module.max_norm,
            norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq,
            mode=module.mode,
            sparse=module.sparse,
            include_last_offset=module.include_last_offset,
            padding_idx=module.padding_idx,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        new.load_state_dict(module.state_dict())
        return _same_flags(module, new)


def _same_flags(source: nn.Module, target: nn.Module) -> nn.Module:
    for name, p in source.named_parameters():
        target.get_parameter(name).requires_grad_(p.requires_grad)
    return target.train(source.training)

"""Autocast for a one-example loss: the forward and backward in half precision, the loss in float32."""

from __future__ import annotations

from collections.abc import Callable

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def autocast_loss(loss_fn: Callable[..., torch.Tensor], dtype: torch.dtype | None):
    """`loss_fn` run under `torch.autocast(dtype)` on its parameters' device, loss in float32."""
    if dtype is None:
        return loss_fn

    def loss(params, buffers, *example):
        leaves = [p for p in optree.tree_leaves(params) if isinstance(p, torch.Tensor)]
        device_type = leaves[0].device.type if leaves else "cpu"
        with torch.autocast(device_type, dtype=dtype), _NormsInFloat32(device_type):
            value = loss_fn(params, buffers, *example)
        return value.float()

    return loss


class _NormsInFloat32(TorchFunctionMode):
    """Runs layer_norm and instance_norm on a float32 input with autocast off.

    Autocast computes them in float32 anyway; but handed a half-precision input and float32
    affine parameters, torch's batched backward of these two fails under vmap(grad) ("expected
    scalar type BFloat16 but found Float", torch 2.13), so the input is widened first.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        half = (torch.float16, torch.bfloat16)
        if func in (F.layer_norm, F.instance_norm) and args and args[0].dtype in half:
            with torch.autocast(self.device_type, enabled=False):
                return func(args[0].float(), *args[1:], **kwargs)
        return func(*args, **kwargs)

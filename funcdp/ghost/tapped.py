"""The one tapped pass of a batch: the per-example gradients of the vmap fallback's parameters,
and each tapped op's input A and output gradient B, from one forward and backward."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.func import grad, vmap

from funcdp._pieces import in_whole_chunks
from funcdp.ghost import capture


class Pass(NamedTuple):
    """What the one vmap(grad) pass returns, stacked over examples."""

    fallback: dict[str, torch.Tensor]  # per-example gradients of the fallback parameters
    taps: list[torch.Tensor]  # B of each tapped op
    losses: torch.Tensor
    inputs: tuple[torch.Tensor, ...]  # A of each tapped op


def one_pass(loss_fn, params, plan, batch, chunk_size, randomness="different") -> Pass:
    """One pass: fallback gradients, tap gradients (B), losses and op inputs (A).

    With fallback parameters (or chunks), `vmap(grad)` over the examples. Without, only the
    forward is vmapped and one plain backward of the summed losses gives every tap's gradient
    (each example's loss depends on its own tap rows only): no grad transform, whose per-op
    wrapping costs more than the small model's arithmetic. `randomness` is vmap's.
    """
    if not plan.fallback and chunk_size is None:
        return _forward_pass(loss_fn, params, plan, batch, randomness)
    fallback = {name: params[name] for name in plan.fallback}
    rest = {name: p for name, p in params.items() if name not in fallback}

    # The parameters are arguments, not closures: a compiled step would otherwise guard on
    # (and recompile for) each step's parameter tensors.
    def one(diff, rest, *example):
        own, example_taps = diff
        full = {name: own[name] if name in own else rest[name] for name in params}
        loss, inputs = tapped_loss(loss_fn, full, plan, example_taps, example)
        return loss, (loss, inputs)

    in_dims = ((None, 0), None) + (0,) * len(batch)
    mapped = vmap(
        grad(one, has_aux=True), in_dims=in_dims, chunk_size=chunk_size, randomness=randomness
    )
    (fallback_grads, tap_grads), (losses, inputs) = in_whole_chunks(
        lambda *rows: mapped((fallback, _zero_taps(plan, rows)), rest, *rows), chunk_size, *batch
    )
    return Pass(fallback_grads, tap_grads, losses, inputs)


def _forward_pass(loss_fn, params, plan, batch, randomness):
    """`one_pass` with no fallback parameters: a vmapped forward, then one backward."""
    params = {name: p.detach() for name, p in params.items()}
    taps = [tap.requires_grad_() for tap in _zero_taps(plan, batch)]

    def one(example_taps, params, *example):  # params as an argument: see one_pass
        return tapped_loss(loss_fn, params, plan, example_taps, example)

    in_dims = (0, None) + (0,) * len(batch)
    with torch.enable_grad():
        losses, inputs = vmap(one, in_dims=in_dims, randomness=randomness)(taps, params, *batch)
        grads = torch.autograd.grad(losses.sum(), taps, allow_unused=True, materialize_grads=True)
    inputs = tuple(a.detach() for a in inputs)
    return Pass({}, list(grads), losses.detach(), inputs)


def _zero_taps(plan, batch) -> list[torch.Tensor]:
    """One zero tap per planned op, [B, *its output shape for one example].

    Each is one zero broadcast to that shape (stride 0): nothing is filled or read but that
    one element, and its gradient still has the full shape.
    """
    size, device = batch[0].shape[0], batch[0].device
    return [
        torch.zeros((), dtype=op.out_dtype, device=device).expand(size, *op.out_shape)
        for op in plan.ops
    ]


def tapped_loss(loss_fn, params, plan, taps, example):
    """One example's loss with the planned ops tapped; returns it and the ops' inputs (A)."""
    if not plan.ops:  # nothing to tap: no mode over the forward's every call
        return loss_fn(params, *example), ()
    tapper = capture.Tapper(params, plan.ops, taps)
    with tapper:
        loss = loss_fn(params, *example)
    tapper.check_complete()
    return loss, tuple(tapper.inputs)

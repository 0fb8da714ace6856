"""`explain`: which parameters ghost clipping handles, which fall back to vmap, and why.

Ghost clipping (`Performance(mode="ghost"|"auto")`) never forms the per-example gradients of
parameters used only in a supported slot of a supported op; every other parameter gets its
per-example gradients from `vmap` in the same pass (exact, but slower and memory-hungry). The
choice comes from a probe of the loss on the first example (`funcdp.ghost.capture.plan`);
`explain` runs that probe and says, per parameter, what it saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from funcdp.data import Batch
from funcdp.ghost import capture, matmul

GHOST, VMAP = "ghost", "vmap"


class Explanation(NamedTuple):
    """One parameter's engine under ghost clipping.

    Attributes:
      parameter: its name, as in `params`.
      engine: "ghost" (norm and clipped sum from the op's input and output gradient) or
        "vmap" (per-example gradient formed).
      uses: how the forward used it ("ghost linear.weight", "addmm.weight", "matmul", ...).
      reason: why, in words, and what would move it to ghost clipping.
    """

    parameter: str
    engine: str
    uses: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{self.parameter}: {self.engine} ({self.reason})"


def explain(
    loss_fn: Callable[..., torch.Tensor],
    params: Mapping[str, torch.Tensor],
    batch: Batch | tuple[torch.Tensor, ...],
    *,
    buffers: Mapping[str, torch.Tensor] | None = None,
    conv_explicit: str = "vmap",
) -> list[Explanation]:
    """Explains, per parameter, whether ghost clipping handles it and why (or why not).

    Args:
      loss_fn: `loss_fn(params, buffers, *example)`, the loss of ONE example, as
        `make_train_step` takes it.
      params: the trainable parameters (a dict, as `functionalize` returns them).
      batch: a `Batch` or a tuple of tensors [B, ...]; only the first row is run.
      buffers: the buffers the loss receives (default: none).
      conv_explicit: as `ghost_clipped_sum`'s: "vmap" sends a conv whose explicit gradient is
        cheaper than ghost clipping to vmap.

    Returns:
      One `Explanation` per parameter, in `params` order.
    """
    inputs = batch.inputs if isinstance(batch, Batch) else batch
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    buffers = dict(buffers or {})
    plan = capture.plan(
        lambda p, *example: loss_fn(p, buffers, *example),
        params,
        inputs,
        conv_explicit=conv_explicit,
    )
    forms = _matmul_forms(plan, params, inputs[0].shape[0])
    out = []
    for name in params:
        uses = plan.uses.get(name, ())
        engine = GHOST if name in plan.ghost else VMAP
        reason = _reason(engine, uses)
        if engine == GHOST and name in forms:
            reason = f"{reason}; {forms[name]}"
        out.append(Explanation(name, engine, uses, reason))
    return out


def _matmul_forms(plan, params, size: int) -> dict[str, str]:
    """For each linear (or addmm) weight, how its norm is taken at this batch's size and
    sequence length (`matmul.matmul_form`, in the pass's order and memory budget): Gram matrices
    over positions, or the gradient formed."""
    forms, budget = {}, matmul.Budget()
    for op in plan.ops:
        if op.kind not in (capture.LINEAR, capture.ADDMM) or op.weight is None:
            continue
        p = op.out_shape[-1] if op.out_shape else 1
        positions = math.prod(op.out_shape[:-1])
        d = params[op.weight].numel() // p
        if positions == 1:
            forms[op.weight] = "one position: the norm of an outer product"
        else:
            forms[op.weight] = budget.choose(size, positions, p, d)
    return forms


def _reason(engine: str, uses: tuple[str, ...]) -> str:
    if engine == GHOST:
        if len(uses) > 1:
            return "an embedding tied to a linear output layer: the norm of the summed gradient"
        return uses[0].removeprefix("ghost ")
    if not uses:
        return "the forward never reads it (its gradient is zero); freeze it"
    if len(uses) == 1 and uses[0].startswith("ghost conv."):
        return (
            "a conv whose per-example gradient costs less to form than ghost norms "
            "(T (p + d) >= p d): vmap's batched conv backward is faster"
        )
    if len(uses) > 1:
        ops = ", ".join(use.removeprefix("ghost ") for use in uses)
        return (
            f"used {len(uses)} times ({ops}): a shared weight's gradient sums its uses; only an "
            "embedding tied to a linear output layer has a ghost rule"
        )
    use = uses[0]
    op, _, slot = use.partition(".")
    if slot in ("weight", "bias"):
        return (
            f"the {slot} of {op} with arguments ghost clipping does not handle (e.g. addmm "
            "with beta or alpha other than 1, embedding with max_norm or scale_grad_by_freq)"
        )
    if slot:
        return f"passed to {op} as its {slot}, not as a weight or bias"
    return f"read by {use}, which has no ghost rule (only linear, conv, embedding, norms, addmm)"


def format_explanations(explanations: list[Explanation]) -> str:
    """A summary line and one line per parameter, vmap ones first."""
    ghost = sum(e.engine == GHOST for e in explanations)
    lines = [f"ghost clipping: {ghost} of {len(explanations)} parameters; vmap: the rest"]
    ordered = sorted(explanations, key=lambda e: e.engine != VMAP)
    lines += [f"  {e}" for e in ordered]
    return "\n".join(lines)


__all__ = ["Explanation", "explain", "format_explanations"]

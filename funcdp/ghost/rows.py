"""Per-example gradients from vmap's batched kernels that do not depend on the example's row.

A batched matrix product can round an example's sum over positions differently by the
example's row in the batch (this CPU's does, for narrow shapes, from about nine rows on), and
an example's row depends on which examples were sampled before it. The rounding moves a linear
op's per-example gradient by at most gamma_T times its terms, sum_t |A_t| |G_t| (and its bias's
by gamma_T sum_t |G_t|): a few roundings of an ordinary example's gradient, but an example
whose terms cancel (inputs with a large common part under output gradients of opposite signs)
has a gradient that is mostly rounding, and removing another example moved a clipped sum by
up to twice the clip bound (a linear op), 6.9 times (a 1x1 conv).

So the vmap fallback's linear, addmm and conv ops over several positions are tapped ("checked",
`funcdp.ghost.capture`), and an example whose terms exceed AMPLIFICATION times its fallback
gradient's norm is computed again alone, on fresh copies of its inputs: the same call whatever
its row. A compiled graph takes no data-dependent branch: there such an example's fallback
gradient is zero. Other products of a parameter (`matmul`, `einsum`, `conv_transpose`, a linear
op on a view of a parameter such as torch's packed attention projections, funcdp's recurrent
time loop) are not checked (docs/sharp_edges.md, "Nor on its row").
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from funcdp._certify import squares_upper
from funcdp.ghost import capture, tapped
from funcdp.ghost.bounds import AMPLIFICATION
from funcdp.tree import upcast_half, zero_rows


def settle(loss_fn, params, plan, batch, passed: tapped.Pass, real, randomness="different"):
    """`passed` with the fallback gradients of its amplified `real` examples computed alone,
    and the squared-norm bounds [B] of each fallback gradient's rows (`squares_upper`) that the
    check read, for the caller to reuse: {} where it read none or the gradients changed."""
    if not _checked(plan) or not passed.fallback:
        return passed, {}
    leaves = _leaf_squares(passed.fallback)
    squares = torch.stack(list(leaves.values())).sum(0)
    settled = _settled(loss_fn, params, plan, batch, passed, squares, real, randomness)
    return settled, (leaves if settled is passed else {})


def per_example_fn(example_loss, randomness="different"):
    """`fn(params, buffers, rows, real, chunk_size, measure) -> (grads, losses, measured)`:
    every parameter's per-example gradient by `vmap(grad)`, the checked ops' amplified examples
    (of the `real` rows) computed alone, and `measure(grads)`, whose last element must be the
    examples' squared norms [B, G] (float64 upper bounds, as `group_squares` gives): the check
    reads them, so that the caller's measure is its only pass over the gradients (again where
    an example was computed alone). The probe runs once per signature. A loss whose ops the
    tapper cannot follow (a path that changes between calls) has every example computed alone."""
    plans: dict[tuple, capture.Plan | None] = {}

    def fn(params, buffers, rows, real, chunk_size, measure):
        loss = lambda p, *example: example_loss(p, buffers, *example)  # noqa: E731
        key = capture.signature(params, rows)
        if key not in plans:
            plans[key] = capture.plan(loss, params, rows, vmap_all=True)
        plan = plans[key]
        if plan is not None:
            try:
                passed = tapped.one_pass(loss, params, plan, rows, chunk_size, randomness)
            except RuntimeError as error:
                if torch.compiler.is_compiling() or "tapped pass" not in str(error):
                    raise
                warnings.warn(
                    f"{str(error).splitlines()[0]}; each example is computed alone from now on "
                    "(slower), so that no gradient depends on its row",
                    stacklevel=3,
                )
                plans[key] = plan = None
        if plan is None:
            alone = _alone(
                loss,
                params,
                capture.Plan((), frozenset(), tuple(params)),
                rows,
                range(rows[0].shape[0]),
                randomness,
            )
            losses = torch.cat([one.losses for one in alone]).detach()
            grads = {name: torch.cat([one.fallback[name] for one in alone]) for name in params}
            return grads, losses, measure(grads)
        measured = measure(passed.fallback)
        squares = measured[-1].sum(1) if _checked(plan) else None
        settled = _settled(loss, params, plan, rows, passed, squares, real, randomness)
        if settled is not passed:
            measured = measure(settled.fallback)
        return settled.fallback, settled.losses.detach(), measured

    return fn


def _settled(loss_fn, params, plan, batch, passed, squares, real, randomness) -> tapped.Pass:
    """`passed` with its amplified examples' fallback gradients computed alone (zero in a
    compiled graph); `passed` itself where none is (`squares` None: no op is checked). The
    terms' sizes are first bounded cheaply from whole-example norms; only where that bound
    is not conclusive (rarely) are they summed position by position."""
    if squares is None:
        return passed
    limit = AMPLIFICATION * squares.sqrt()
    real = real.to(limit.device)

    def exceeding(size_of):
        terms = sum(
            size_of(
                plan.ops[i], passed.inputs[i], passed.taps[i], params[plan.ops[i].checked].shape
            )
            for i in _checked(plan)
        )
        return real & ~(terms <= limit)

    if torch.compiler.is_compiling():
        amplified = exceeding(_reach)
        kept = {name: zero_rows(g, ~amplified) for name, g in passed.fallback.items()}
        return passed._replace(fallback=kept)
    suspect = exceeding(_reach_bound)
    if not bool(suspect.any()):  # the one device read of the common case
        return passed
    rows = torch.nonzero(suspect & exceeding(_reach)).flatten()
    if rows.numel() == 0:
        return passed
    alone = _alone(loss_fn, params, plan, batch, rows.tolist(), randomness)
    fallback = {
        name: g.index_copy(0, rows, torch.cat([one.fallback[name] for one in alone]))
        for name, g in passed.fallback.items()
    }
    return passed._replace(fallback=fallback)


def _alone(loss_fn, params, plan, batch, rows, randomness) -> list[tapped.Pass]:
    """The pass of each of `rows` alone, on fresh copies of its inputs (a view's offset could
    change a kernel's path): the same call whatever the example's row."""
    return [
        tapped.one_pass(
            loss_fn, params, plan, tuple(x[i : i + 1].clone() for x in batch), None, randomness
        )
        for i in rows
    ]


def _checked(plan) -> list[int]:
    return [i for i, op in enumerate(plan.ops) if op.checked is not None]


def total_squares(grads) -> torch.Tensor:
    """[B, 1]: float64 upper bounds on each example's squared norm over every leaf."""
    return sum(_leaf_squares(grads).values())[:, None]


def _leaf_squares(grads) -> dict[str, torch.Tensor]:
    """[B] per leaf: float64 upper bounds on each example's squared norm of that leaf."""
    return {name: squares_upper(upcast_half(g).flatten(1)) for name, g in grads.items()}


def _reach_bound(op, a: torch.Tensor, g: torch.Tensor, weight_shape) -> torch.Tensor:
    """[B] float64, at least `_reach`: by Cauchy-Schwarz, sum_t (|A_t| + 1) |G_t| <=
    (sqrt(sum_t |A_t|^2) + sqrt(T)) ||G||, and a conv's patches hold each input element at most
    k (its kernel's size) times, so sum_t |A_t|^2 <= k ||A||^2. Two plain reductions; on
    ordinary data within about 10% (a CNN) to 40% (ResNet-18) of the exact sum."""
    a, g = upcast_half(a), upcast_half(g)
    size = g.shape[0]
    if op.kind == capture.CONV:
        overlap, features = math.prod(weight_shape[2:]), weight_shape[0]
    else:
        overlap, features = 1, g.shape[-1]
    positions = g[0].numel() // features
    a_norms = torch.linalg.vector_norm(a.reshape(size, -1), dim=1).double()
    g_norms = torch.linalg.vector_norm(g.reshape(size, -1), dim=1).double()
    return (math.sqrt(overlap) * a_norms + math.sqrt(positions)) * g_norms


def _reach(op, a: torch.Tensor, g: torch.Tensor, weight_shape) -> torch.Tensor:
    """[B] float64: sum over positions of (|A_t| + 1) |G_t|, the size of the terms of a product
    op's weight gradient and of its bias's (whether or not it has one: a bound either way).
    A conv's A_t is the input patch that output position t reads (its norm from a convolution
    of the squared input with ones, over all input channels: a bound for grouped convs too)."""
    a, g = upcast_half(a), upcast_half(g)
    size = g.shape[0]
    if op.kind == capture.CONV:
        nd, config = op.config["nd"], op.config
        # [N, C, *spatial]; channels summed by a plain reduction (vector_norm over a middle
        # dimension runs ten times slower on this CPU), the window by a one-channel conv.
        a = a.reshape(-1, *a.shape[-nd - 1 :]).square().sum(1, keepdim=True)
        g = g.reshape(-1, *g.shape[-nd - 1 :])
        ones = torch.ones((1, 1, *weight_shape[2:]), dtype=a.dtype, device=a.device)
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        patches = conv(a, ones, None, config["stride"], config["padding"], config["dilation"])
        a_norms = patches.clamp(min=0.0).sqrt().reshape(size, -1)
        g_norms = g.square().sum(1).sqrt().reshape(size, -1)
    else:
        a_norms = torch.linalg.vector_norm(a.reshape(size, -1, a.shape[-1]), dim=-1)
        g_norms = torch.linalg.vector_norm(g.reshape(size, -1, g.shape[-1]), dim=-1)
    return ((a_norms.double() + 1.0) * g_norms.double()).sum(1)

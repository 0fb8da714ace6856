"""Property checks for clipping ENGINES (a loss and parameters), and adversarial examples.

`check_sensitivity` checks a transform on gradients it is handed. An engine also computes the
gradients and their norms (vmap, ghost clipping's Gram form, two passes), and that is where
rounding can hide an example's size: a float32 Gram norm of an example whose inputs share a
large common part and whose output gradients nearly cancel can come out near zero. These checks
run the real engines (`funcdp.clipped_sum`, the train step's) on such examples.

The examples come from `sequence_examples`: one example of a linear, conv or embedding layer
(or, with `layers=HF_LAYERS`, HF's Conv1D or an embedding tied to an output layer) applied to a
sequence, with a loss whose output gradient is an input (`(layer(x) * g).sum()`),
so hypothesis controls both A (the layer's input) and G (its output gradient) directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from funcdp._engines import clipped_sum
from funcdp.testing.checks import _settings
from funcdp.transforms.base import GradientTransformation

ENGINES = ("vmap", "ghost", "two_pass")
LAYERS = ("linear", "conv", "embedding")
# Hugging Face's layers: Conv1D (`torch.addmm(bias, x, weight)`, weight [in, out]) and an
# embedding tied to the output layer (GPT-2's wte and lm_head).
HF_LAYERS = ("addmm", "tied")


class Problem(NamedTuple):
    """A layer, its parameters, and per-example inputs stacked over a batch.

    Attributes:
      loss_fn: `loss_fn(params, *example)`, the loss of ONE example.
      params: dict of parameter tensors.
      batch: tuple of tensors [B, ...], one example per row.
    """

    loss_fn: Callable[..., torch.Tensor]
    params: dict[str, torch.Tensor]
    batch: tuple[torch.Tensor, ...]


def check_engine_sensitivity(
    problems: st.SearchStrategy[Problem],
    *,
    max_norm: float = 1.0,
    clipping: GradientTransformation | None = None,
    engines: Sequence[str] = ENGINES,
    tolerance: float = 1e-6,
    max_examples: int = 50,
) -> None:
    """Checks each engine's clipped sum: every example's share is at most the sensitivity.

    With `clipping` (a stateless clipping transform, e.g. a user's `clip_by` rule), the engines
    apply it and its declared sensitivity is the bound checked; without, flat clipping at
    `max_norm`.

    For each drawn problem and engine: (1) each real example alone (the other rows padded, mask
    false) gives a finite sum of norm at most max_norm (1 + tolerance), with a finite reported
    norm (a finite example is never refused as non-finite); (2) removing one example from the
    full batch moves the sum by at most max_norm (1 + tolerance + 2 B^2 u), u the float32 unit
    roundoff, the slack of the float sum over B examples, whether its row is padded in place or,
    as a Poisson loader builds the neighbouring batch, the rows after it move up one and the
    last row is padded. Norms are measured in float64.

    Raises:
      AssertionError: an engine breaks the bound (the message holds the engine and the numbers).
    """
    for mode in engines:
        if mode not in ENGINES:
            raise ValueError(f"engines must be drawn from {ENGINES}, got {mode!r}")
    unit = 2.0**-24
    if clipping is not None:
        max_norm = clipping.sensitivity
    options = {"clipping": clipping} if clipping is not None else {"max_norm": max_norm}

    @settings(**_settings(max_examples))
    @given(problem=problems)
    def run(problem: Problem) -> None:
        size, device = problem.batch[0].shape[0], problem.batch[0].device
        for mode in engines:
            engine = clipped_sum(
                lambda p, b, *example: problem.loss_fn(p, *example), mode=mode, **options
            )

            def fn(params, *batch, mask, engine=engine):
                result = engine(params, {}, *batch, mask=mask)
                return result.grads, result.norms

            full, _ = fn(
                problem.params,
                *problem.batch,
                mask=torch.ones(size, dtype=torch.bool, device=device),
            )
            for i in range(size):
                alone = torch.zeros(size, dtype=torch.bool, device=device)
                alone[i] = True
                summed, norms = fn(problem.params, *problem.batch, mask=alone)
                share = _norm(summed)
                assert math.isfinite(share) and bool(torch.isfinite(norms[i])), (
                    f"{mode}: example {i} alone gave a non-finite sum or norm ({share}, {norms[i]})"
                )
                assert share <= max_norm * (1 + tolerance), (
                    f"{mode}: example {i} alone contributed {share:.9g}, over the bound "
                    f"{max_norm:g} (norm reported {float(norms[i]):.6g})"
                )
                slack = tolerance + 2 * size * size * unit
                # Its row padded in place, or the rows after it moved up and the last padded.
                order = torch.tensor([k for k in range(size) if k != i] + [i], device=device)
                neighbours = {
                    "": (problem.batch, ~alone),
                    " (the rows after it moved up)": (
                        tuple(x[order] for x in problem.batch),
                        torch.arange(size, device=device) < size - 1,
                    ),
                }
                for how, (rows, mask) in neighbours.items():
                    rest, _ = fn(problem.params, *rows, mask=mask)
                    moved = _distance(full, rest)
                    assert moved <= max_norm * (1 + slack), (
                        f"{mode}: removing example {i}{how} moved the sum by {moved:.9g}, "
                        f"over {max_norm:g}"
                    )

    run()


@st.composite
def sequence_examples(
    draw,
    *,
    layers: Sequence[str] = LAYERS,
    max_batch: int = 3,
    max_positions: int = 6,
    scales: Sequence[float] = (1.0, 1e2, 1e4, 1e6, 1e8),
) -> Problem:
    """Adversarial examples of one layer on a sequence: inputs that share a large common part
    (scale up to 1e8) with small differences, and output gradients that nearly cancel across
    positions, beside ordinary random rows."""
    layer = draw(st.sampled_from(tuple(layers)))
    size = draw(st.integers(1, max_batch))
    positions = draw(st.integers(2, max_positions))
    width, out = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    scale = draw(st.sampled_from(tuple(scales)))
    gradient_scale = draw(st.sampled_from(tuple(scales)))
    spread = draw(st.sampled_from((0.0, 1e-3, 1.0, 10.0)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    crafted = [draw(st.booleans()) for _ in range(size)]
    grads = torch.stack(
        [
            _cancelling(positions, out, gradient_scale, gen)
            if c
            else torch.randn(positions, out, generator=gen)
            for c in crafted
        ]
    )
    if layer == "tied":
        return _tied_problem(draw, grads, scale, gen)
    if layer == "embedding":
        vocab = draw(st.integers(1, 4))
        ids = torch.randint(0, vocab, (size, positions), generator=gen)
        weight = torch.randn(vocab, out, generator=gen)
        return Problem(_embedding_loss, {"weight": weight}, (ids, grads))
    common = scale * torch.randn(size, 1, width, generator=gen)
    inputs = common + spread * torch.randn(size, positions, width, generator=gen)
    params = {
        "weight": torch.randn(out, width, generator=gen),
        "bias": torch.randn(out, generator=gen),
    }
    if layer == "linear":
        return Problem(_linear_loss, params, (inputs, grads))
    if layer == "addmm":
        addmm = {"weight": params["weight"].T.contiguous(), "bias": params["bias"]}
        return Problem(_addmm_loss, addmm, (inputs, grads))
    # A conv of kernel k: its output positions are the first T - k + 1; windows overlap, and
    # with enough channels ghost clipping takes the Gram form rather than forming the gradient.
    kernel = draw(st.integers(1, min(3, positions)))
    weight = torch.randn(out, width, kernel, generator=gen)
    conv = {"weight": weight, "bias": params["bias"]}
    kept = grads[:, : positions - kernel + 1]
    return Problem(_conv_loss, conv, (inputs.transpose(1, 2), kept.transpose(1, 2)))


def _tied_problem(draw, grads: torch.Tensor, scale: float, gen) -> Problem:
    """An embedding [V, d] whose weight is also a linear output layer's; `grads` [B, T, d] is
    the embedding output's gradient. Crafted rows make the linear use's gradient cancel the
    embedding's: the linear input is `scale` times the identity (T' = d positions) and its
    output gradient is minus the embedding's gradient, transposed, up to a 1e-6 wobble."""
    size, positions, width = grads.shape
    vocab = draw(st.integers(1, 24))  # above 2 d, the linear use takes the Gram form
    ids = torch.randint(0, vocab, (size, positions), generator=gen)
    weight = torch.randn(vocab, width, generator=gen)
    inputs = torch.empty(size, width, width)
    out_grads = torch.empty(size, width, vocab)
    for i in range(size):
        if draw(st.booleans()):
            embedding_grad = torch.zeros(vocab, width).index_add(0, ids[i], grads[i])
            wobble = 1.0 + 1e-6 * torch.randn(vocab, width, generator=gen)
            inputs[i] = scale * torch.eye(width)
            out_grads[i] = -(embedding_grad * wobble).T / scale
        else:
            inputs[i] = torch.randn(width, width, generator=gen)
            out_grads[i] = torch.randn(width, vocab, generator=gen)
    return Problem(_tied_loss, {"weight": weight}, (ids, grads, inputs, out_grads))


def _cancelling(positions: int, width: int, scale: float, gen) -> torch.Tensor:
    """Output gradients of one example that nearly cancel across positions: +v, -v(1 + e), ..."""
    v = scale * torch.randn(width, generator=gen)
    signs = torch.tensor([(-1.0) ** t for t in range(positions)])
    wobble = 1.0 + 1e-6 * torch.randn(positions, 1, generator=gen)
    return signs[:, None] * v * wobble


def _linear_loss(params, x, g):
    return (F.linear(x, params["weight"], params["bias"]) * g).sum()


def _addmm_loss(params, x, g):
    return (torch.addmm(params["bias"], x, params["weight"]) * g).sum()


def _tied_loss(params, ids, g, x, h):
    weight = params["weight"]
    return (F.embedding(ids, weight) * g).sum() + (F.linear(x, weight) * h).sum()


def _conv_loss(params, x, g):
    return (F.conv1d(x, params["weight"], params["bias"]) * g).sum()


def _embedding_loss(params, ids, g):
    return (F.embedding(ids, params["weight"]) * g).sum()


def _norm(tree: dict[str, Any]) -> float:
    return math.sqrt(sum(float(x.double().square().sum()) for x in tree.values()))


def _distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in a))

"""Tests for funcdp/per_sample.py: vmap(grad) equals a per-example loop of torch.autograd.grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import MODELS, Tied, make
from torch import nn

import funcdp as fdp

# torch has no batching rule for CPU flash-attention's backward; vmap falls back to a loop (correct,
# slower) and warns. funcdp/nn is where a vmap-friendly attention belongs.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

BATCH = 7


def _setup(name: str):
    return make(name, BATCH)


def _loop_reference(module: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per-example gradients, losses and logits from the module itself, one example at a time."""
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    tensors = [p for p in module.parameters() if p.requires_grad]
    grads = {name: [] for name in names}
    losses, logits = [], []
    for i in range(x.shape[0]):
        out = module(x[i : i + 1])
        loss = F.cross_entropy(out, y[i : i + 1])
        for name, g in zip(names, torch.autograd.grad(loss, tensors), strict=True):
            grads[name].append(g)
        losses.append(loss.detach())
        logits.append(out.detach()[0])
    return {k: torch.stack(v) for k, v in grads.items()}, torch.stack(losses), torch.stack(logits)


def _loss_fns(module: nn.Module):
    apply_fn, params, buffers = fdp.functionalize(module)

    def loss_fn(p, x, y):
        return F.cross_entropy(apply_fn(p, buffers, x[None]), y[None])

    def loss_with_aux(p, x, y):
        logits = apply_fn(p, buffers, x[None])
        return F.cross_entropy(logits, y[None]), logits[0]

    return params, loss_fn, loss_with_aux


def _assert_grads_close(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    module, x, y = _setup(request.param)
    return module, x, y, _loop_reference(module, x, y)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_per_sample_grads_equal_loop(case, chunk_size):
    module, x, y, (ref_grads, _, _) = case
    params, loss_fn, _ = _loss_fns(module)
    grads = fdp.per_sample_grads(loss_fn, chunk_size=chunk_size)(params, x, y)
    _assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_per_sample_grads_and_losses_equal_loop(case, chunk_size):
    module, x, y, (ref_grads, ref_losses, _) = case
    params, loss_fn, _ = _loss_fns(module)
    grads, losses = fdp.per_sample_grads_and_losses(loss_fn, chunk_size=chunk_size)(params, x, y)
    _assert_grads_close(grads, ref_grads)
    assert losses.shape == (BATCH,)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_per_sample_norms_equal_loop(case, chunk_size):
    module, x, y, (ref_grads, _, _) = case
    params, loss_fn, _ = _loss_fns(module)
    norms = fdp.per_sample_norms(loss_fn, chunk_size=chunk_size)(params, x, y)
    flat = torch.cat([g.reshape(BATCH, -1).double() for g in ref_grads.values()], dim=1)
    assert norms.shape == (BATCH,)
    torch.testing.assert_close(norms.double(), flat.norm(dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_has_aux_stacks_aux_over_examples(case, chunk_size):
    module, x, y, (ref_grads, _, ref_logits) = case
    params, _, loss_with_aux = _loss_fns(module)
    grads, aux = fdp.per_sample_grads(loss_with_aux, chunk_size=chunk_size, has_aux=True)(
        params, x, y
    )
    _assert_grads_close(grads, ref_grads)
    torch.testing.assert_close(aux, ref_logits, rtol=1e-5, atol=1e-5)


def test_frozen_params_get_no_gradient_but_shape_the_others():
    module, x, y = _setup("frozen")
    params, loss_fn, _ = _loss_fns(module)
    grads = fdp.per_sample_grads(loss_fn)(params, x, y)
    assert "fc1.weight" not in grads and "norm.bias" not in grads
    # fc1.bias's gradient flows through the frozen fc1.weight's layer: changing the frozen weight
    # changes it, and the loop over the changed module still agrees.
    with torch.no_grad():
        module.fc1.weight.mul_(-2.0)
    changed = fdp.per_sample_grads(loss_fn)(params, x, y)
    assert not torch.allclose(changed["fc1.bias"], grads["fc1.bias"])
    _assert_grads_close(changed, _loop_reference(module, x, y)[0])


def test_tied_weight_gets_the_sum_of_both_uses():
    module, x, y = _setup("tied")
    params, loss_fn, _ = _loss_fns(module)
    assert "head.weight" not in params
    grads = fdp.per_sample_grads(loss_fn)(params, x, y)
    # Untied, the embedding alone would get only the gradient through the embedding lookup.
    untied = Tied()
    untied.load_state_dict(module.state_dict())
    untied.head.weight = nn.Parameter(module.embed.weight.detach().clone())
    embed_only = _loop_reference(untied, x, y)[0]["embed.weight"]
    assert not torch.allclose(grads["embed.weight"], embed_only, atol=1e-4)


def test_dropout_draws_differ_between_examples():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 1))
    apply_fn, params, buffers = fdp.functionalize(module)

    def loss_fn(p, x):
        return apply_fn(p, buffers, x[None]).sum()

    x = torch.ones(4, 4)  # identical examples
    grads = fdp.per_sample_grads(loss_fn)(params, x)
    assert not torch.equal(grads["2.weight"][0], grads["2.weight"][1])


def test_params_may_be_any_pytree():
    def loss_fn(p, x):
        (w,), b = p["layers"], p["bias"]
        return ((x @ w + b) ** 2).sum()

    params = {"layers": [torch.randn(3, 2)], "bias": torch.randn(2)}
    x = torch.randn(5, 3)
    grads = fdp.per_sample_grads(loss_fn)(params, x)
    residual = x @ params["layers"][0] + params["bias"]
    torch.testing.assert_close(grads["bias"], 2 * residual)
    torch.testing.assert_close(grads["layers"][0], 2 * x[:, :, None] * residual[:, None, :])


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, "2"])
def test_bad_chunk_size_raises(chunk_size):
    for factory in (fdp.per_sample_grads, fdp.per_sample_grads_and_losses, fdp.per_sample_norms):
        with pytest.raises(
            ValueError, match=f"chunk_size must be a positive int or None, got {chunk_size!r}"
        ):
            factory(lambda p, x: x.sum(), chunk_size=chunk_size)


def test_no_batched_argument_raises():
    with pytest.raises(ValueError, match="at least one batched argument"):
        fdp.per_sample_grads(lambda p: p.sum())(torch.ones(2))

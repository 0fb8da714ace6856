"""Tests for funcdp/functional.py: functionalize and to_module."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import funcdp as fdp


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.Sequential(nn.BatchNorm2d(4)),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 2),
    )


def test_params_and_buffers_keyed_as_named_tensors():
    module = _conv_bn().eval()
    _, params, buffers = fdp.functionalize(module)
    assert list(params) == [name for name, _ in module.named_parameters()]
    assert list(buffers) == [name for name, _ in module.named_buffers()]
    assert "1.0.running_mean" in buffers and "1.0.num_batches_tracked" in buffers
    for name, tensor in module.named_parameters():
        assert torch.equal(params[name], tensor)
        assert not params[name].requires_grad


def test_params_are_detached_copies():
    module = _net()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    apply_fn, params, buffers = fdp.functionalize(module)
    for name, tensor in module.named_parameters():
        assert params[name].data_ptr() != tensor.data_ptr()
    for p in params.values():
        p.add_(1.0)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name])
    # A gradient step on the functional params leaves the module as it was.
    x = torch.randn(5, 4)
    grads = torch.func.grad(lambda p: apply_fn(p, buffers, x).sum())(params)
    params = {k: v - 0.1 * grads[k] for k, v in params.items()}
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_apply_fn_equals_forward():
    module = _net()
    apply_fn, params, buffers = fdp.functionalize(module)
    x = torch.randn(7, 4)
    torch.testing.assert_close(apply_fn(params, buffers, x), module(x), rtol=0, atol=0)
    # It computes with the params it is given, not the module's.
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    assert torch.equal(apply_fn(zeros, buffers, x), torch.zeros(7, 3))


def test_apply_fn_passes_keyword_arguments():
    module = nn.MultiheadAttention(4, 2, batch_first=True)
    apply_fn, params, buffers = fdp.functionalize(module)
    x = torch.randn(2, 3, 4)
    out, weights = apply_fn(params, buffers, x, x, x, need_weights=True)
    expected, expected_weights = module(x, x, x, need_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


def test_batchnorm_in_training_mode_is_refused():
    module = _conv_bn().train()
    with pytest.raises(ValueError, match=r"submodule '1\.0' \(BatchNorm2d\).*funcdp\.fix"):
        fdp.functionalize(module)


def test_top_level_batchnorm_is_named_by_its_type():
    with pytest.raises(ValueError, match=r"submodule 'BatchNorm1d'.*funcdp\.fix"):
        fdp.functionalize(nn.BatchNorm1d(3))


def test_batchnorm_in_eval_mode_is_accepted_and_uses_running_stats():
    module = _conv_bn()
    module[1][0].running_mean.uniform_(-1, 1)
    module.eval()
    apply_fn, params, buffers = fdp.functionalize(module)
    x = torch.randn(3, 1, 6, 6)
    torch.testing.assert_close(apply_fn(params, buffers, x), module(x), rtol=0, atol=0)


def test_fixed_module_is_accepted():
    module = fdp.fix(_conv_bn().train())
    apply_fn, params, buffers = fdp.functionalize(module)
    x = torch.randn(3, 1, 6, 6)
    torch.testing.assert_close(apply_fn(params, buffers, x), module(x), rtol=0, atol=0)


def test_frozen_params_are_left_out_but_used():
    module = _net()
    module[0].weight.requires_grad_(False)
    apply_fn, params, buffers = fdp.functionalize(module)
    assert "0.weight" not in params
    assert set(params) == {"0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
    x = torch.randn(5, 4)
    before = apply_fn(params, buffers, x)
    torch.testing.assert_close(before, module(x), rtol=0, atol=0)
    with torch.no_grad():
        module[0].weight.zero_()
    # The frozen weight is read from the module: zeroing it changes the output.
    after = apply_fn(params, buffers, x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, module(x), rtol=0, atol=0)


def test_to_module_returns_a_copy_holding_the_given_params():
    module = _conv_bn().eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _, params, buffers = fdp.functionalize(module)
    trained = {k: v + 1.0 for k, v in params.items()}
    new_buffers = {k: (v + 2 if v.is_floating_point() else v) for k, v in buffers.items()}
    out = fdp.to_module(module, SimpleNamespace(params=trained, buffers=new_buffers))
    assert out is not module and isinstance(out, type(module))
    state = out.state_dict()
    for name, value in {**trained, **new_buffers}.items():
        assert torch.equal(state[name], value)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name])
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(out(x), fdp.functionalize(out)[0](trained, new_buffers, x))


def test_to_module_keeps_frozen_params_and_accepts_no_buffers():
    module = _net()
    module[0].weight.requires_grad_(False)
    _, params, _ = fdp.functionalize(module)
    trained = {k: torch.zeros_like(v) for k, v in params.items()}
    out = fdp.to_module(module, SimpleNamespace(params=trained, buffers=None))
    assert torch.equal(out[0].weight, module[0].weight)
    assert not out[0].weight.requires_grad
    assert torch.equal(out[3].weight, torch.zeros(3, 6))


def test_to_module_refuses_unknown_tensors():
    module = _net()
    with pytest.raises(ValueError, match="does not have.*'extra.weight'"):
        fdp.to_module(module, SimpleNamespace(params={"extra.weight": torch.zeros(1)}, buffers={}))


def test_to_module_with_tied_weights_sets_both_uses():
    module = _Tied()
    _, params, _ = fdp.functionalize(module)
    assert list(params) == ["embed.weight"]
    out = fdp.to_module(
        module, SimpleNamespace(params={"embed.weight": torch.ones(10, 4)}, buffers={})
    )
    assert out.head.weight is out.embed.weight
    assert torch.equal(out.head.weight, torch.ones(10, 4))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(-2))


def test_tied_weights_are_tied_in_apply_fn():
    module = _Tied()
    apply_fn, params, buffers = fdp.functionalize(module)
    tokens = torch.randint(0, 10, (3, 5))
    torch.testing.assert_close(apply_fn(params, buffers, tokens), module(tokens), rtol=0, atol=0)
    # Replacing the one tied tensor replaces both of its uses.
    zero = {"embed.weight": torch.zeros(10, 4)}
    assert torch.equal(apply_fn(zero, buffers, tokens), torch.zeros(3, 10))


def test_to_module_accepts_non_persistent_buffers():
    module = nn.Linear(2, 2)
    module.register_buffer("ids", torch.arange(3), persistent=False)
    _, params, buffers = fdp.functionalize(module)
    buffers["ids"] = torch.arange(3) + 10
    trained = fdp.to_module(module, SimpleNamespace(params=params, buffers=buffers))
    assert torch.equal(trained.ids, torch.arange(3) + 10)

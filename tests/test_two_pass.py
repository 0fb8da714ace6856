"""Tests for `clipped_sum` in funcdp/clipped_sum.py: the two-pass path equals the vmap path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import make
from torch import nn

import funcdp as fdp


def clipped_sum(loss_fn, **options):
    """`fdp.clipped_sum` for a loss of (params, *example), returning (sum, norms)."""
    fn = fdp.clipped_sum(lambda p, buffers, *example: loss_fn(p, *example), **options)

    def summed(params, *batch, mask=None):
        result = fn(params, {}, *batch, mask=mask)
        return result.grads, result.norms

    return summed


# torch's MultiheadAttention has no batching rule on CPU (funcdp.nn has one); it is tested as is.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

# The models of the per-example gradient tests.
MODELS = ("linear_layernorm", "conv2d", "embedding", "multihead_attention", "frozen", "tied")


def _setup(name: str, batch: int = 11):
    module, x, y = make(name, batch)
    apply_fn, params, buffers = fdp.functionalize(module)

    def loss_fn(p, x, y):
        return F.cross_entropy(apply_fn(p, buffers, x[None]), y[None])

    return loss_fn, params, x, y


def _reference(loss_fn, params, x, y, mask, max_norm):
    """Clip-and-sum by an explicit loop of torch.autograd.grad, one example at a time."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(x.shape[0]):
        if not mask[i]:
            continue
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(loss_fn(leaves, x[i], y[i]), list(leaves.values()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, max_norm / float(norm))
        for k, g in zip(leaves, grads, strict=True):
            total[k] += factor * g
    return total


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_two_pass_equals_vmap_and_a_loop(name, chunk_size):
    loss_fn, params, x, y = _setup(name)
    mask = torch.tensor([True, False, True, True, True, False, True, True, True, True, False])
    # the median real norm: some examples are clipped, some are not
    max_norm = float(fdp.per_sample_norms(loss_fn)(params, x, y)[mask].median())
    vmap_sum, vmap_norms = clipped_sum(loss_fn, max_norm=max_norm)(params, x, y, mask=mask)
    two_sum, two_norms = clipped_sum(
        loss_fn, max_norm=max_norm, mode="two_pass", chunk_size=chunk_size
    )(params, x, y, mask=mask)
    reference = _reference(loss_fn, params, x, y, mask, max_norm)
    clipped = (vmap_norms > max_norm) & mask
    assert clipped.any() and (~clipped & mask).any()
    torch.testing.assert_close(two_norms, vmap_norms, rtol=1e-5, atol=1e-6)
    assert (two_norms[~mask] == 0).all()
    for k in params:
        torch.testing.assert_close(two_sum[k], vmap_sum[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vmap_sum[k], reference[k], rtol=1e-5, atol=1e-5)


def test_two_pass_with_a_factor_rule_matches_the_chain():
    loss_fn, params, x, y = _setup("linear_layernorm")
    automatic = fdp.transforms.normalize_per_example(0.5, 0.01)
    fn = clipped_sum(loss_fn, clipping=automatic, mode="two_pass", chunk_size=3)
    two_sum, _ = fn(params, x, y)
    grads = fdp.per_sample_grads(loss_fn)(params, x, y)
    summed = fdp.chain(automatic, fdp.aggregate())
    expected, _ = summed.update(grads, summed.init(params))
    for k in params:
        torch.testing.assert_close(two_sum[k], expected[k], rtol=1e-5, atol=1e-6)


def test_padded_rows_do_not_matter_even_if_not_finite():
    loss_fn, params, x, y = _setup("linear_layernorm", batch=6)
    mask = torch.tensor([True, True, False, True, False, True])
    garbage = x.clone()
    garbage[~mask] = float("nan")
    for mode in ("vmap", "two_pass"):
        fn = clipped_sum(loss_fn, max_norm=1.0, mode=mode)
        clean, _ = fn(params, x, y, mask=mask)
        dirty, _ = fn(params, garbage, y, mask=mask)
        for k in params:
            assert torch.isfinite(dirty[k]).all()
            torch.testing.assert_close(dirty[k], clean[k], rtol=0, atol=0)


def test_all_padded_batch_sums_to_zero():
    loss_fn, params, x, y = _setup("conv2d", batch=3)
    out, norms = clipped_sum(loss_fn, max_norm=1.0, mode="two_pass")(
        params, x, y, mask=torch.zeros(3, dtype=torch.bool)
    )
    assert all(torch.equal(out[k], torch.zeros_like(params[k])) for k in params)
    assert torch.equal(norms, torch.zeros(3))


def test_two_pass_refuses_random_layers():
    module = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    apply_fn, params, buffers = fdp.functionalize(module)

    def loss_fn(p, x):
        return apply_fn(p, buffers, x[None]).sum()

    with pytest.raises(RuntimeError, match="randomness"):
        clipped_sum(loss_fn, max_norm=1.0, mode="two_pass")(params, torch.randn(3, 4))


def test_argument_errors():
    with pytest.raises(ValueError, match="exactly one of max_norm and clipping"):
        clipped_sum(lambda p, x: x, mode="vmap")
    with pytest.raises(ValueError, match="exactly one of max_norm and clipping"):
        clipped_sum(lambda p, x: x, max_norm=1.0, clipping=fdp.clip(1.0))
    with pytest.raises(ValueError, match="stateless clipping transform"):
        adaptive = fdp.adaptive_clip(1.0, count_noise_multiplier=1.0, expected_batch_size=4)
        clipped_sum(lambda p, x: x, clipping=adaptive)
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0, got 0"):
        clipped_sum(lambda p, x: x, max_norm=0)
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0, got True"):
        clipped_sum(lambda p, x: x, max_norm=True)  # a bool is not a norm (it was taken as 1)
    with pytest.raises(
        ValueError, match='mode must be "auto", "vmap", "ghost" or "two_pass", got \'bogus\''
    ):
        clipped_sum(lambda p, x: x, max_norm=1.0, mode="bogus")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        clipped_sum(lambda p, x: x, max_norm=1.0, mode="two_pass", chunk_size=0)

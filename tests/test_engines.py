"""Tests for funcdp/_engines.py: one clipped-sum interface, the same for users and the step.

`fdp.clipped_sum` and `make_train_step` take the same loss, `loss_fn(params, buffers, *example)`,
and run the same engines (vmap, ghost, two-pass), each applying the clipping transform's factor
rule from norms [B, G] to factors [B, G].
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcdp as fdp

MODES = ("vmap", "ghost", "two_pass")


class _Scaled(nn.Module):
    """A model whose forward reads a buffer: the buffers must reach the loss in every engine."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) * self.scale))


def _setup(batch=7):
    torch.manual_seed(0)
    apply_fn, params, buffers = fdp.functionalize(_Scaled())

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    x, y = torch.randn(batch, 4), torch.randint(0, 3, (batch,))
    return loss_fn, params, buffers, x, y


def _loop(loss_fn, params, buffers, x, y, mask, clipping):
    """The clipped sum by a loop of torch.autograd.grad, one example at a time."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(x.shape[0]):
        if not mask[i]:
            continue
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(loss_fn(leaves, buffers, x[i], y[i]), list(leaves.values()))
        one = {k: g[None] for k, g in zip(leaves, grads, strict=True)}
        clipped, _ = clipping.update(one, clipping.init(params))
        total = {k: total[k] + clipped[k][0] for k in total}
    return total


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheme", ["flat", "per_layer", "automatic"])
def test_every_engine_equals_a_loop_with_the_buffers_used(mode, scheme):
    loss_fn, params, buffers, x, y = _setup()
    clipping = {
        "flat": fdp.clip(0.3),
        "per_layer": fdp.clip_per_layer({"fc1": 0.2, "fc2": 0.4}, groups=lambda p: p.split(".")[0]),
        "automatic": fdp.normalize_per_example(0.5, 0.01),
    }[scheme]
    mask = torch.tensor([True, True, False, True, True, True, False])
    fn = fdp.clipped_sum(loss_fn, clipping=clipping, mode=mode, chunk_size=3)
    result = fn(params, buffers, x, y, mask=mask)
    expected = _loop(loss_fn, params, buffers, x, y, mask, clipping)
    for name, value in expected.items():
        torch.testing.assert_close(result.grads[name], value, rtol=1e-4, atol=1e-6)
    assert result.clipped[mask].any() and not result.clipped[~mask].any()
    assert (result.norms[~mask] == 0).all() and result.finite.all()
    other = fn(params, {"scale": torch.tensor(0.5)}, x, y, mask=mask)  # the buffer is read
    assert not torch.allclose(other.grads["fc1.weight"], result.grads["fc1.weight"])


def test_train_step_in_two_pass_mode_equals_vmap_mode():
    loss_fn, params, buffers, x, y = _setup()
    mask = torch.tensor([True, True, False, True, True, True, False])
    privatizer = fdp.chain(
        fdp.clip_per_layer({"fc1": 0.2, "fc2": 0.4}, groups=lambda p: p.split(".")[0]),
        fdp.aggregate(),
        fdp.gaussian_noise(1.0),
    )
    optimizer = fdp.optim.sgd(0.5)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(1)
    )
    results = {}
    for mode in ("vmap", "two_pass"):
        performance = fdp.Performance(mode=mode, chunk_size=2)
        step = fdp.make_train_step(loss_fn, privatizer, optimizer, performance=performance)
        results[mode] = step(state, fdp.Batch((x, y), mask))
    (vmap_state, vmap_metrics), (two_state, two_metrics) = results["vmap"], results["two_pass"]
    assert two_metrics["clipped_fraction"] == vmap_metrics["clipped_fraction"] > 0
    for name, value in vmap_state.params.items():
        torch.testing.assert_close(two_state.params[name], value, rtol=1e-5, atol=1e-6)


def test_two_pass_mode_refuses_what_it_cannot_do_when_built():
    adaptive = fdp.adaptive_clip(1.0, count_noise_multiplier=5.0, expected_batch_size=4)
    privatizer = fdp.chain(adaptive, fdp.aggregate(), fdp.gaussian_noise(1.0))
    with pytest.raises(ValueError, match='mode="two_pass" needs a privatizer'):
        fdp.make_train_step(
            lambda p, b, x: x.sum(),
            privatizer,
            fdp.optim.sgd(0.1),
            performance=fdp.Performance(mode="two_pass"),
        )


def test_a_factor_rule_of_the_wrong_shape_is_refused_in_every_engine():
    loss_fn, params, buffers, x, y = _setup()
    wrong = fdp.clip_by(lambda norms: norms[:, 0], 1.0)  # [B], not [B, G]
    for mode in MODES:
        with pytest.raises(ValueError, match=r"factor_fn must return a tensor of shape \(7, 1\)"):
            fdp.clipped_sum(loss_fn, clipping=wrong, mode=mode)(params, buffers, x, y)


def test_auto_takes_vmap_where_ghost_clipping_cannot_follow_the_loss():
    """A loss with a vmap inside (one unit = several rows) is beyond ghost clipping's capture:
    "auto" says so once and runs vmap; "ghost" raises."""
    apply_fn, params, buffers = fdp.functionalize(nn.Linear(3, 2))

    def unit_loss(params, buffers, x, y):
        def row_loss(xi, yi):
            return F.cross_entropy(apply_fn(params, buffers, xi[None]), yi[None])

        return torch.func.vmap(row_loss)(x, y).mean()

    x, y = torch.randn(4, 5, 3), torch.randint(0, 2, (4, 5))
    auto = fdp.clipped_sum(unit_loss, max_norm=0.5, mode="auto")
    with pytest.warns(UserWarning, match="ghost clipping could not run this loss"):
        first = auto(params, buffers, x, y)
    expected = fdp.clipped_sum(unit_loss, max_norm=0.5, mode="vmap")(params, buffers, x, y)
    for name, value in expected.grads.items():
        torch.testing.assert_close(first.grads[name], value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per example shape, whatever the rows
        auto(params, buffers, x, y)
        auto(params, buffers, x[:3], y[:3])
    with pytest.raises(RuntimeError):
        fdp.clipped_sum(unit_loss, max_norm=0.5, mode="ghost")(params, buffers, x, y)


def test_vmap_computes_each_example_alone_where_the_tapper_cannot_follow_the_loss():
    """The vmap engine taps its linear ops over several positions to check their rounding by
    row (`funcdp.ghost.rows`). A loss whose path differs from the probe's (here its first call,
    the probe, runs a second linear op) cannot be tapped: the engine says so and computes each
    example alone, which gives the per-example loop's gradients."""
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, generator=gen), "v": torch.randn(3, 3, generator=gen)}
    x, y = torch.randn(5, 6, 4, generator=gen), torch.randn(5, 6, 3, generator=gen)
    calls = []

    def loss(params, buffers, x, y):
        calls.append(1)
        out = F.linear(x, params["w"])
        if len(calls) == 1:  # the probe's path only
            out = F.linear(out, params["v"])
        return (out * y).sum()

    engine = fdp.clipped_sum(loss, max_norm=0.5, mode="vmap")
    with pytest.warns(UserWarning, match="each example is computed alone"):
        result = engine(params, {}, x, y)
    rows = [torch.func.grad(loss)(params, {}, x[i], y[i]) for i in range(5)]
    norms = torch.stack([torch.linalg.vector_norm(r["w"]) for r in rows])
    expected = sum(r["w"] * min(1.0, 0.5 / float(n)) for r, n in zip(rows, norms, strict=True))
    torch.testing.assert_close(result.grads["w"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.grads["v"], torch.zeros(3, 3))


def _bound_between(low: float, high: float, under: torch.Tensor) -> float:
    """A bound in (low, high) where min(1, C / n) in float32, as computed before, came out one
    unit below 1 for a norm n under it."""
    for step in range(1, 1000):
        bound = low + (high - low) * step / 1000
        if bool((bound / torch.clamp(under, min=bound) < 1).any()):
            return bound
    raise AssertionError("no such bound")


@pytest.mark.parametrize("mode", MODES)
def test_an_example_under_a_bound_that_is_not_a_float32_value_is_not_clipped(mode):
    """C between two examples' norms and not a float32 value: the examples under it keep
    factor 1 (they were scaled by one unit below 1, and reported clipped)."""
    loss_fn, params, buffers, x, y = _setup()
    norms = fdp.clipped_sum(loss_fn, max_norm=1.0, mode="vmap")(params, buffers, x, y).norms
    ordered = norms.sort().values
    bound = _bound_between(float(ordered[2]), float(ordered[3]), ordered[:3])
    result = fdp.clipped_sum(loss_fn, max_norm=bound, mode=mode)(params, buffers, x, y)
    assert result.clipped.tolist() == (norms.double() > bound).tolist()
    assert int(result.clipped.sum()) == len(norms) - 3


def test_flat_factors_are_exactly_one_under_the_bound_and_c_over_n_above():
    from funcdp._rules import flat_factors

    gen = torch.Generator().manual_seed(0)
    for bound in (torch.rand(200, generator=gen, dtype=torch.float64) * 10 + 0.01).tolist():
        norms = torch.tensor([0.5 * bound, bound, 2.0 * bound, math.inf, math.nan])
        factors = flat_factors(bound)(norms.float())
        wide = norms.float().double()
        under = wide <= bound
        assert factors[under].eq(1).all()
        over = ~under & torch.isfinite(wide)
        torch.testing.assert_close(factors[over].double(), bound / wide[over], rtol=1e-7, atol=0)
        assert factors[3] == 0 and math.isnan(factors[4])

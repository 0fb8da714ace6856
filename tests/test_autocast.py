"""Tests for Performance(autocast_dtype=...): half-precision forward/backward, fp32 privacy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_trees_equal
from torch import nn

import funcdp as fdp
from funcdp.tree import global_norm, tree_map

HALF = [torch.bfloat16, torch.float16]
MODES = ["vmap", "ghost"]  # ghost: the ops' inputs and output gradients are widened instead


def _problem(clip: float, noise: float, scale: float = 1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    apply_fn, params, buffers = fdp.functionalize(model)
    seen_dtypes = []

    def loss_fn(p, b, x, y):
        logits = apply_fn(p, b, x[None])
        seen_dtypes.append(logits.dtype)
        return F.cross_entropy(logits, y[None])

    privatizer = fdp.chain(
        fdp.clip(clip), fdp.aggregate(), fdp.gaussian_noise(noise), fdp.account(0.1)
    )
    x, y = scale * torch.randn(24, 12), torch.randint(0, 4, (24,))
    return loss_fn, privatizer, params, buffers, x, y, seen_dtypes


def _step(
    loss_fn, privatizer, params, buffers, batch, *, steps=1, lr=1.0, performance=fdp.Performance()
):
    optimizer = fdp.optim.sgd(lr)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, performance=performance)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(5)
    )
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", HALF)
def test_each_clipped_contribution_stays_within_the_clip(dtype, mode):
    clip = 0.25
    loss_fn, privatizer, params, buffers, x, y, seen = _problem(clip, noise=0.0, scale=30.0)
    for row in range(0, 24, 3):  # one real example per batch: the update is its clipped gradient
        mask = torch.arange(24) == row
        state, (metrics,) = _step(
            loss_fn,
            privatizer,
            params,
            buffers,
            fdp.Batch((x, y), mask),
            performance=fdp.Performance(autocast_dtype=dtype, mode=mode),
        )
        change = tree_map(torch.sub, params, state.params)
        assert all(v.dtype == torch.float32 for v in state.params.values())
        assert metrics["grad_norm"] > clip  # the example was clipped ...
        assert float(global_norm(change)) <= clip * (1 + 1e-5)  # ... to C, in float32
        assert float(global_norm(change)) == pytest.approx(clip, rel=1e-4)
    if mode == "vmap":  # the step's pass (its last call; its probe runs first) ran in half
        assert seen[-1] == dtype
    # ghost mode's forward is vmap without grad, where torch's batching rule splits a linear
    # into a half-precision matmul and a float32 bias add: the logits come out float32. That
    # the arithmetic was half precision is checked below (the step differs from float32's).


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", HALF)
def test_a_step_matches_float32_within_half_precision_error(dtype, mode):
    loss_fn, privatizer, params, buffers, x, y, _ = _problem(clip=1.0, noise=0.0)
    batch = fdp.Batch((x, y), torch.arange(24) < 20)
    want, want_metrics = _step(loss_fn, privatizer, params, buffers, batch, steps=3, lr=0.2)
    got, got_metrics = _step(
        loss_fn,
        privatizer,
        params,
        buffers,
        batch,
        steps=3,
        lr=0.2,
        performance=fdp.Performance(autocast_dtype=dtype, mode=mode),
    )
    change_want = tree_map(torch.sub, want.params, params)
    change_got = tree_map(torch.sub, got.params, params)
    error = float(global_norm(tree_map(torch.sub, change_got, change_want)))
    # bf16 keeps 8 bits of mantissa (relative error ~4e-3 per op), fp16 keeps 11.
    assert error <= 0.05 * float(global_norm(change_want))
    assert error > 0  # autocast really changed the arithmetic
    for g, w in zip(got_metrics, want_metrics, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=0.03)
        assert g["loss"] != w["loss"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", HALF)
def test_noise_is_drawn_in_float32(dtype, mode):
    # All rows padded: the update is the noise alone, which must be the float32 draw of the key.
    loss_fn, privatizer, params, buffers, x, y, _ = _problem(clip=1.0, noise=1.0)
    empty = fdp.Batch((x, y), torch.zeros(24, dtype=torch.bool))
    want, _ = _step(loss_fn, privatizer, params, buffers, empty, steps=2)
    got, _ = _step(
        loss_fn,
        privatizer,
        params,
        buffers,
        empty,
        steps=2,
        performance=fdp.Performance(autocast_dtype=dtype, mode=mode),
    )
    assert_trees_equal(got.params, want.params)
    # and the noise is not a rounded half-precision value
    change = got.params["0.weight"] - params["0.weight"]
    assert not torch.equal(change, change.to(dtype).float())
    # with real rows, the noisy step keeps the same noise: it differs from fp32 only by the
    # half-precision error of the (clipped, summed) gradients, far below the noise's scale
    batch = fdp.Batch((x, y), torch.ones(24, dtype=torch.bool))
    want, _ = _step(loss_fn, privatizer, params, buffers, batch)
    got, _ = _step(
        loss_fn,
        privatizer,
        params,
        buffers,
        batch,
        performance=fdp.Performance(autocast_dtype=dtype, mode=mode),
    )
    gap = float(global_norm(tree_map(torch.sub, got.params, want.params)))
    assert 0 < gap < 0.05 * float(global_norm(tree_map(torch.sub, want.params, params)))


def test_per_example_gradients_reach_the_privatizer_in_float32():
    loss_fn, _, params, buffers, x, y, _ = _problem(clip=1.0, noise=0.0)
    seen = {}

    def spy_update(updates, state, params=None, *, key=None, mask=None):
        del params, key, mask
        seen.update({name: g.dtype for name, g in updates.items()})
        return updates, state

    spy = fdp.GradientTransformation(lambda p: (), spy_update, "per_example", sensitivity=None)
    privatizer = fdp.chain(spy, fdp.clip(1.0), fdp.aggregate())
    half_params = {k: v.to(torch.bfloat16) for k, v in params.items()}
    batch = fdp.Batch((x, y), torch.ones(24, dtype=torch.bool))
    state, metrics = _step(
        loss_fn,
        privatizer,
        half_params,
        buffers,
        batch,
        performance=fdp.Performance(autocast_dtype=torch.bfloat16),
    )
    assert set(seen.values()) == {torch.float32}  # bf16 parameters, fp32 per-example gradients
    assert all(v.dtype == torch.bfloat16 for v in state.params.values())  # kept as given
    assert isinstance(metrics[0]["loss"], float)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, "bfloat16", torch.int8])
def test_bad_autocast_dtype_raises(dtype):
    loss_fn, privatizer, *_ = _problem(clip=1.0, noise=1.0)
    with pytest.raises(
        ValueError,
        match=r"autocast_dtype must be None, torch.bfloat16 or torch.float16, got",
    ):
        fdp.make_train_step(
            loss_fn,
            privatizer,
            fdp.optim.sgd(0.1),
            performance=fdp.Performance(autocast_dtype=dtype),
        )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", HALF)
def test_affine_layer_and_instance_norms_train_under_autocast(dtype, mode):
    # torch's batched backward of these norms fails on a half input with float32 affine
    # parameters; funcdp runs them on a float32 input, as autocast computes them anyway.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3),
        nn.InstanceNorm1d(4, affine=True),
        nn.Flatten(),
        nn.LayerNorm(16),
        nn.Linear(16, 2),
    )
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x[None]), y[None])

    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate())
    x, y = torch.randn(12, 3, 6), torch.randint(0, 2, (12,))
    batch = fdp.Batch((x, y), torch.ones(12, dtype=torch.bool))
    want, _ = _step(
        loss_fn, privatizer, params, buffers, batch, performance=fdp.Performance(mode=mode)
    )
    got, _ = _step(
        loss_fn,
        privatizer,
        params,
        buffers,
        batch,
        performance=fdp.Performance(mode=mode, autocast_dtype=dtype),
    )
    change = float(global_norm(tree_map(torch.sub, want.params, params)))
    error = float(global_norm(tree_map(torch.sub, got.params, want.params)))
    assert 0 < error <= 0.05 * change

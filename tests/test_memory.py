"""Tests for funcdp/memory.py: chunk sizes picked from a memory budget, and chunk_size="auto"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_trees_close, assert_trees_equal
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import funcdp as fdp
from funcdp import memory
from funcdp.memory import AutoChunk


def _mlp_problem(batch: int = 12, width: int = 16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(p, x, y):
        return F.cross_entropy(apply_fn(p, buffers, x[None]), y[None])

    x, y = torch.randn(batch, 5), torch.randint(0, 3, (batch,))
    return loss_fn, params, buffers, apply_fn, x, y


@given(
    example=st.integers(1, 10**6),
    budget=st.integers(0, 10**8),
    batch=st.integers(1, 512),
)
def test_chunk_for_budget_is_the_largest_chunk_that_fits(example, budget, batch):
    chunk = memory.chunk_for_budget(example, budget, batch)
    assert 1 <= chunk <= batch
    if example <= budget:  # at least one example fits: the chunk fits
        assert chunk * example <= budget
    # and one more example would not fit, unless the chunk is the whole batch
    assert chunk == batch or (chunk + 1) * example > budget


def test_chunk_for_budget_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        memory.chunk_for_budget(10, 100, 0)


def test_example_cost_counts_the_gradient_exactly_and_activations_grow_with_the_input():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(1, -1))
    apply_fn, params, buffers = fdp.functionalize(conv)

    def loss_fn(p, x):
        return apply_fn(p, buffers, x[None]).square().sum()

    small = memory.example_cost(loss_fn, params, torch.randn(3, 8, 8))
    large = memory.example_cost(loss_fn, params, torch.randn(3, 32, 32))
    numel = sum(p.numel() for p in params.values())
    assert small.gradient_bytes == large.gradient_bytes == numel * 4
    assert not small.measured  # on the CPU, activations are an upper bound
    # The forward alone writes the conv output (8 channels) and the ReLU output: 2 * 8 * H * W
    # floats, a lower bound on what the estimate must count.
    assert small.activation_bytes >= 2 * 8 * 8 * 8 * 4
    assert large.activation_bytes >= 2 * 8 * 32 * 32 * 4
    assert large.activation_bytes > 8 * small.activation_bytes  # 16x the pixels
    assert small.total == small.gradient_bytes + small.activation_bytes


@pytest.mark.parametrize("examples", [1, 3, 7])
def test_auto_chunk_size_picks_the_largest_chunk_under_the_budget(examples):
    loss_fn, params, _, _, x, y = _mlp_problem()
    cost = memory.example_cost(loss_fn, params, x[0], y[0]).total
    for slack in (0, cost - 1):  # a budget of `examples` costs, and just under one more
        budget = examples * cost + slack
        chunk = memory.auto_chunk_size(loss_fn, params, x, y, spec=AutoChunk(budget_bytes=budget))
        assert chunk == examples
        assert chunk * cost <= budget < (chunk + 1) * cost


def test_auto_chunk_size_is_one_when_nothing_fits_and_the_batch_when_all_fit():
    loss_fn, params, _, _, x, y = _mlp_problem(batch=6)
    assert memory.auto_chunk_size(loss_fn, params, x, y, spec=AutoChunk(budget_bytes=1)) == 1
    assert memory.auto_chunk_size(loss_fn, params, x, y, spec=AutoChunk(budget_bytes=2**40)) == 6
    # The default budget (half the available RAM) holds this small model's whole batch.
    assert memory.auto_chunk_size(loss_fn, params, x, y) == 6


def test_memory_budget_follows_the_spec():
    assert memory.memory_budget("cpu", AutoChunk(budget_bytes=12345)) == 12345
    free = memory.free_memory("cpu")
    assert free > 0
    half = memory.memory_budget("cpu")
    assert 0 < half <= free
    quarter = memory.memory_budget("cpu", AutoChunk(fraction=0.25))
    assert 0 < quarter < half


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (AutoChunk(budget_bytes=0), "AutoChunk.budget_bytes must be a positive int or None, got 0"),
        (AutoChunk(budget_bytes=1.5), "AutoChunk.budget_bytes must be a positive int or None"),
        (AutoChunk(fraction=0.0), r"AutoChunk.fraction must be in \(0, 1\], got 0.0"),
        (AutoChunk(fraction=1.5), r"AutoChunk.fraction must be in \(0, 1\], got 1.5"),
        ("automatic", "chunk_size must be a positive int or None, got 'automatic'"),
        (0, "chunk_size must be a positive int or None, got 0"),
    ],
)
def test_bad_chunk_options_raise(spec, message):
    with pytest.raises(ValueError, match=message):
        memory.check_chunk_option(spec)
    with pytest.raises(ValueError, match=message):
        fdp.per_sample_grads(lambda p, x: x.sum(), chunk_size=spec)
    with pytest.raises(ValueError, match=message):
        fdp.make_train_step(
            lambda p, b, x: x.sum(),
            fdp.chain(fdp.clip(1.0), fdp.aggregate()),
            fdp.optim.sgd(0.1),
            performance=fdp.Performance(chunk_size=spec),
        )


@pytest.mark.parametrize("spec", ["auto", AutoChunk(budget_bytes=1), AutoChunk(fraction=0.1)])
def test_auto_per_sample_grads_equal_the_unchunked_path(spec):
    loss_fn, params, _, _, x, y = _mlp_problem(batch=10)
    expected = fdp.per_sample_grads(loss_fn)(params, x, y)
    assert_trees_close(fdp.per_sample_grads(loss_fn, chunk_size=spec)(params, x, y), expected)
    grads, losses = fdp.per_sample_grads_and_losses(loss_fn, chunk_size=spec)(params, x, y)
    assert_trees_close(grads, expected)
    torch.testing.assert_close(losses, torch.vmap(loss_fn, in_dims=(None, 0, 0))(params, x, y))


def test_auto_per_sample_grads_with_aux():
    loss_fn, params, _, _, x, y = _mlp_problem(batch=5)

    def with_aux(p, x, y):
        loss = loss_fn(p, x, y)
        return loss, loss * 2

    grads, aux = fdp.per_sample_grads(with_aux, chunk_size=AutoChunk(budget_bytes=1), has_aux=True)(
        params, x, y
    )
    assert_trees_close(grads, fdp.per_sample_grads(loss_fn)(params, x, y))
    torch.testing.assert_close(aux, 2 * torch.vmap(loss_fn, in_dims=(None, 0, 0))(params, x, y))


def test_auto_chunk_is_measured_once_per_batch_shape(monkeypatch):
    loss_fn, params, _, _, x, y = _mlp_problem(batch=8)
    calls = []
    original = memory.example_cost

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(memory, "example_cost", counting)
    grads_fn = fdp.per_sample_grads(loss_fn, chunk_size="auto")
    for _ in range(3):
        grads_fn(params, x, y)
    assert len(calls) == 1
    grads_fn(params, x[:4], y[:4])  # a new shape is measured again
    assert len(calls) == 2


def _train_problem():
    loss_fn, params, buffers, apply_fn, x, y = _mlp_problem(batch=16)

    def train_loss(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x[None]), y[None])

    privatizer = fdp.chain(
        fdp.clip(0.5),
        fdp.aggregate(),
        fdp.gaussian_noise(1.0),
        fdp.normalize(16),
        fdp.account(0.1),
    )
    optimizer = fdp.optim.sgd(0.3)
    mask = torch.arange(16) < 13
    return train_loss, privatizer, optimizer, params, buffers, fdp.Batch((x, y), mask)


def _run(steps: int, performance: fdp.Performance):
    loss_fn, privatizer, optimizer, params, buffers, batch = _train_problem()
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, performance=performance)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(7)
    )
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize("mode", ["vmap", "auto"])  # auto: ghost, nothing to chunk on an MLP
@pytest.mark.parametrize(
    "performance",
    [
        fdp.Performance(chunk_size="auto"),
        fdp.Performance(chunk_size=AutoChunk(budget_bytes=1)),  # one example at a time
        fdp.Performance(chunk_size=AutoChunk(budget_bytes=1), microbatch_size=5),
    ],
)
def test_auto_train_step_equals_the_unchunked_step(performance, mode):
    expected, expected_metrics = _run(3, fdp.Performance(mode="vmap"))
    state, metrics = _run(3, performance._replace(mode=mode))
    assert_trees_close(state.params, expected.params, rtol=1e-6, atol=1e-6)
    assert state.step == 3
    assert fdp.epsilon(state.ledger, delta=1e-5) == fdp.epsilon(expected.ledger, delta=1e-5)
    for got, want in zip(metrics, expected_metrics, strict=True):
        assert got["batch_size"] == want["batch_size"] == 13
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_auto_train_step_measures_once_and_keeps_the_state_pure(monkeypatch):
    calls = []
    original = memory.examples_in_budget

    def counting(*args, **kwargs):
        calls.append(kwargs["spec"])
        return original(*args, **kwargs)

    monkeypatch.setattr("funcdp._engines.examples_in_budget", counting)
    loss_fn, privatizer, optimizer, params, buffers, batch = _train_problem()
    step = fdp.make_train_step(
        loss_fn, privatizer, optimizer, performance=fdp.Performance(chunk_size="auto", mode="vmap")
    )
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(7)
    )
    before = {k: v.clone() for k, v in state.params.items()}
    new, _ = step(state, batch)
    step(new, fdp.Batch(batch.inputs, torch.arange(16) < 7))  # 7 real rows computed, not 13
    assert calls == ["auto"]  # measured on the first step only, whatever the batch's size
    assert_trees_equal(state.params, before)  # the probe changed nothing


def test_the_probe_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(p, x, y):
        return F.cross_entropy(apply_fn(p, buffers, x[None]), y[None])

    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    torch.manual_seed(1)
    expected = fdp.per_sample_grads(loss_fn, chunk_size=6)(params, x, y)
    torch.manual_seed(1)
    got = fdp.per_sample_grads(loss_fn, chunk_size=AutoChunk(budget_bytes=2**40))(params, x, y)
    assert_trees_equal(got, expected)  # same dropout masks: the probe drew nothing visible

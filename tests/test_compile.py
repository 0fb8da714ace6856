"""Tests for Performance(compile=...): the compiled step gives the eager step's parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_trees_close, assert_trees_equal
from torch import nn

import funcdp as fdp
from funcdp.memory import AutoChunk


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x[None]), y[None])

    privatizer = fdp.chain(
        fdp.clip(0.5),
        fdp.aggregate(),
        fdp.gaussian_noise(1.0),
        fdp.normalize(16),
        fdp.account(0.1),
    )
    optimizer = fdp.optim.momentum(0.5, 0.9)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    return loss_fn, privatizer, optimizer, params, buffers, x, y


def _start(key: int = 3, on_nonfinite="raise", performance=fdp.Performance()):
    """The problem's step (built with `on_nonfinite` and `performance`), its initial state and
    its data."""
    loss_fn, privatizer, optimizer, params, buffers, x, y = _problem()
    step = fdp.make_train_step(
        loss_fn, privatizer, optimizer, on_nonfinite=on_nonfinite, performance=performance
    )
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(key)
    )
    return step, state, x, y


def _run(steps: int, key: int = 3, performance=fdp.Performance()):
    step, state, x, y = _start(key, performance=performance)
    metrics = []
    for t in range(steps):
        mask = torch.arange(16) < 9 + t  # a different number of real rows each step
        state, m = step(state, fdp.Batch((x, y), mask))
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize("mode", ["ghost", "vmap"])
def test_compiled_step_gives_the_eager_parameters_after_five_noisy_steps(mode):
    torch._dynamo.reset()
    eager, eager_metrics = _run(5, performance=fdp.Performance(mode=mode))
    inductor = fdp.Performance(mode=mode, compile=True)  # inductor, the default backend
    compiled, compiled_metrics = _run(5, performance=inductor)
    assert compiled.step == eager.step == 5
    assert_trees_close(compiled.params, eager.params, rtol=1e-5, atol=1e-5)
    assert_trees_close(compiled.opt_state, eager.opt_state, rtol=1e-5, atol=1e-5)
    assert fdp.epsilon(compiled.ledger, delta=1e-5) == fdp.epsilon(eager.ledger, delta=1e-5)
    for got, want in zip(compiled_metrics, eager_metrics, strict=True):
        assert got["batch_size"] == want["batch_size"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    # The noise is on and matters: another key moves the parameters far more than 1e-5.
    other, _ = _run(5, key=4, performance=fdp.Performance(mode=mode))
    gap = max((other.params[k] - eager.params[k]).abs().max().item() for k in eager.params)
    assert gap > 1e-2


def test_compiled_ghost_step_with_stacked_gram_weights_gives_the_eager_parameters(monkeypatch):
    """A sequence model whose weights all take the Gram form, of three widths (certified as one
    stack, their Grams written into one buffer): compiled, the eager parameters."""
    from funcdp.ghost import bounds, matmul

    monkeypatch.setattr(bounds, "EXPLICIT_ELEMENTS", 0)  # the Gram form wherever not smaller
    stacks, certify_alike = [], matmul._certify_alike

    def recorded(jobs):
        stacks.append(len(jobs))
        return certify_alike(jobs)

    monkeypatch.setattr(matmul, "_certify_alike", recorded)
    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = [nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24)]
    apply_fn, params, buffers = fdp.functionalize(nn.Sequential(*layers, nn.Linear(24, 3)))

    def loss_fn(p, b, x, y):  # five positions, averaged
        return F.cross_entropy(apply_fn(p, b, x[None]).mean(1), y[None])

    x, y = torch.randn(16, 5, 12), torch.randint(0, 3, (16,))

    def run(performance):
        privatizer = fdp.chain(fdp.clip(0.5), fdp.aggregate(), fdp.gaussian_noise(1.0))
        optimizer = fdp.optim.sgd(0.1)
        step = fdp.make_train_step(loss_fn, privatizer, optimizer, performance=performance)
        state = fdp.TrainState.create(
            params,
            buffers=buffers,
            privatizer=privatizer,
            optimizer=optimizer,
            key=fdp.random.key(1),
        )
        for t in range(3):
            state, _ = step(state, fdp.Batch((x, y), torch.arange(16) < 10 + t))
        return state.params

    eager = run(fdp.Performance(mode="ghost"))
    compiled = run(fdp.Performance(mode="ghost", compile={"backend": "aot_eager"}))
    assert_trees_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert set(stacks) == {4}  # 12 -> 24, the two 24 -> 24 and 24 -> 3: one stack


@pytest.mark.parametrize("mode", ["ghost", "vmap"])
def test_compile_options_combine_with_autocast_auto_chunks_and_microbatches(mode):
    torch._dynamo.reset()
    performance = fdp.Performance(
        chunk_size=AutoChunk(budget_bytes=1),
        microbatch_size=5,
        autocast_dtype=torch.bfloat16,
        mode=mode,
    )
    eager, _ = _run(3, performance=performance)
    compiled, _ = _run(3, performance=performance._replace(compile={"backend": "aot_eager"}))
    assert_trees_close(compiled.params, eager.params, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["ghost", "vmap"])
def test_a_warm_compiled_step_does_not_compile_again(mode):
    """Keys, noise and the ledger stay out of the graphs, and no graph holds on to a step's
    parameters: new parameters, keys, masks and ledger entries reuse the first compilations."""
    torch._dynamo.reset()
    step, state, x, y = _start(
        performance=fdp.Performance(mode=mode, compile={"backend": "aot_eager"})
    )
    for t in range(8):
        mask = torch.arange(16) < 9 + t % 5
        with torch._dynamo.config.patch(error_on_recompile=t >= 2):
            state, _ = step(state, fdp.Batch((x, y), mask))
    assert state.step == 8 and state.ledger.steps == 8


@pytest.mark.parametrize("mode", ["ghost", "vmap"])
def test_the_tensor_work_of_a_run_is_one_graph_for_the_pieces_and_one_for_the_optimizer(mode):
    """The first step runs the clipped sum eagerly (the ghost probe fills its cache there), so
    the second traces a piece's clipped sum as one graph that every later piece reuses, a batch
    of two buckets included: nothing splits it and runs eagerly between (the probe, the ghost
    pass's backward, key derivation, the finite check). The optimizer's graph is traced for
    the first step's count and again for any count."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    step, state, x, y = _start(
        performance=fdp.Performance(mode=mode, compile={"backend": "aot_eager"})
    )
    for t in range(3):
        state, _ = step(state, fdp.Batch((x, y), torch.arange(16) < 9 + t, bucket_size=16))
    two_buckets = fdp.Batch(
        (torch.cat([x, x]), torch.cat([y, y])), torch.arange(32) < 20, bucket_size=16
    )
    state, _ = step(state, two_buckets)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 3


@pytest.mark.parametrize("mode", ["ghost", "vmap"])
def test_a_compiled_step_leaves_out_nan_in_padded_rows(mode):
    """A compiled graph cannot recheck a non-finite sum: it selects padded rows away up front."""
    torch._dynamo.reset()
    results = []
    for compile in (False, {"backend": "aot_eager"}):
        step, state, x, y = _start(performance=fdp.Performance(mode=mode, compile=compile))
        state, _ = step(state, fdp.Batch((x, y), torch.ones(16, dtype=torch.bool)))  # eager
        x = x.clone()
        x[12:] = float("nan")  # padded rows
        state, _ = step(state, fdp.Batch((x, y), torch.arange(16) < 12))  # compiled
        results.append(state.params)
    assert all(torch.isfinite(p).all() for p in results[1].values())
    assert_trees_close(results[1], results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,shared", [("ghost", False), ("ghost", True), ("vmap", False)])
def test_a_compiled_step_leaves_out_an_example_whose_rounding_could_follow_its_row(mode, shared):
    """An example whose linear terms cancel is computed alone in eager mode, whatever its row
    (`matmul.settle`, `funcdp.ghost.rows`); a compiled graph cannot branch on it, so there its
    share is zero: the compiled step equals the eager step without that example."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    size, positions, d, p = 12, 16, 5, 3
    x, g = torch.randn(size, positions, d, generator=gen), torch.randn(size, positions, p)
    x[4] += 1e8 * torch.randn(1, d, generator=gen)  # a large common part ...
    g[4] = torch.randn(1, p, generator=gen) * torch.tensor([1.0, -1.0] * 8)[:, None]  # cancels

    def loss_fn(params, buffers, x, g):
        second_use = 0.0 * params["weight"].sum() if shared else 0.0  # sends it to vmap
        return (F.linear(x, params["weight"]) * g).sum() + second_use

    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate())
    optimizer = fdp.optim.sgd(1.0)
    state = fdp.TrainState.create(
        {"weight": torch.randn(p, d, generator=gen)},
        privatizer=privatizer,
        optimizer=optimizer,
        key=fdp.random.key(0),
    )
    everyone, without = torch.ones(size, dtype=torch.bool), torch.arange(size) != 4
    performance = fdp.Performance(mode=mode, compile={"backend": "aot_eager"})
    compiled = fdp.make_train_step(loss_fn, privatizer, optimizer, performance=performance)
    eager = fdp.make_train_step(loss_fn, privatizer, optimizer, performance=fdp.Performance(mode))
    alone, _ = compiled(state, fdp.Batch((x, g), everyone))  # the first call runs eagerly
    assert_trees_close(alone.params, eager(state, fdp.Batch((x, g), everyone))[0].params)
    left_out, _ = compiled(state, fdp.Batch((x, g), everyone))
    expected, _ = eager(state, fdp.Batch((x, g), without))
    assert_trees_close(left_out.params, expected.params, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(left_out.params["weight"], alone.params["weight"], atol=1e-3)


def test_compiled_step_refuses_a_nonfinite_example_and_keeps_the_state():
    torch._dynamo.reset()
    step, state, x, y = _start(
        on_nonfinite="skip", performance=fdp.Performance(compile={"backend": "aot_eager"})
    )
    params = dict(state.params)
    bad = x.clone()
    bad[2, 0] = float("nan")
    new, metrics = step(state, fdp.Batch((bad, y), torch.ones(16, dtype=torch.bool)))
    assert metrics["skipped"] and metrics["nonfinite"] == 1
    assert new is state
    assert_trees_equal(new.params, params)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_compile_option_raises(bad):
    loss_fn, privatizer, optimizer, *_ = _problem()
    with pytest.raises(ValueError, match="compile must be a bool or a dict of torch.compile"):
        fdp.make_train_step(
            loss_fn, privatizer, optimizer, performance=fdp.Performance(compile=bad)
        )

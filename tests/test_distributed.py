"""Tests for the train step on torch.distributed: 2 gloo processes against one process."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy import stats
from torch import nn

import funcdp as fdp
from funcdp.data import PoissonLoader, poisson_batches
from funcdp.distributed import RankFailedError, broadcast_state
from tests import gloo

WORLD = 2
N, Q, SIGMA, CLIP, STEPS = 64, 0.25, 1.3, 0.5, 4


def _data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(N, 5, generator=gen), torch.randint(0, 3, (N,), generator=gen)


def _setup(group=None, fail_on=None, compile=False):
    """A small model, its DP step and initial state; with `fail_on=(rank, armed)`, the loss
    raises on that rank, inside the step, while `armed[0]` is true."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        if fail_on is not None and dist.get_rank() == fail_on[0] and fail_on[1][0]:
            raise ValueError("injected failure")
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    privatizer = fdp.chain(
        fdp.clip(CLIP),
        fdp.aggregate(),
        fdp.gaussian_noise(SIGMA),
        fdp.normalize(N * Q),
        fdp.account(Q),
    )
    optimizer = fdp.optim.sgd(0.5, momentum=0.9)
    step = fdp.make_train_step(
        loss_fn,
        privatizer,
        optimizer,
        process_group=group,
        performance=fdp.Performance(compile=compile),
    )
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(7)
    )
    return state, step


def _train(state, step, rank, world, steps=STEPS, start=0):
    metrics = []
    for batch in PoissonLoader(
        _data(), Q, key=fdp.random.key(1), steps=steps, rank=rank, world_size=world, start=start
    ):
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


def _zero_gradient_noise(group, coordinates=6000):
    """The update of one step whose per-example gradients are all zero: pure noise."""
    params = {"w": torch.zeros(coordinates)}

    def loss_fn(params, buffers, x):
        return (params["w"] * 0.0).sum() + x.sum() * 0.0

    privatizer = fdp.chain(
        fdp.clip(CLIP), fdp.aggregate(), fdp.gaussian_noise(SIGMA), fdp.account(Q)
    )
    optimizer = fdp.optim.sgd(1.0)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, process_group=group)
    state = fdp.TrainState.create(
        params, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(11)
    )
    shard = (dist.get_rank(group), dist.get_world_size(group))  # each rank's own 4 rows
    batch = fdp.Batch((torch.ones(4, 1),), torch.ones(4, dtype=torch.bool), shard=shard)
    new_state, _ = step(state, batch)
    return new_state.params["w"] - state.params["w"]


def _worker(rank, init_file, out_dir):
    gloo.join(rank, init_file, WORLD)
    group = dist.group.WORLD
    results = {}
    state, step = _setup(group)
    state = broadcast_state(state, group)
    final, metrics = _train(state, step, rank, WORLD)
    results["params"], results["ledger"], results["metrics"] = final.params, final.ledger, metrics
    half, _ = _train(state, step, rank, WORLD, steps=STEPS // 2)  # every rank steps together
    if rank == 0:  # rank 0 writes the checkpoint, to be resumed on one process
        torch.save(half, f"{out_dir}/checkpoint.pt")
    results["noise"] = _zero_gradient_noise(group)
    state, step = _setup(group, compile={"backend": "aot_eager"})
    results["compiled"], _ = _train(broadcast_state(state, group), step, rank, WORLD)

    armed = [False]
    state, step = _setup(group, fail_on=(1, armed))
    outcome = []
    for batch in PoissonLoader(
        _data(), Q, key=fdp.random.key(1), steps=STEPS, rank=rank, world_size=WORLD
    ):
        armed[0] = state.step == 2
        try:
            new_state, _ = step(state, batch)
        except (ValueError, RankFailedError) as error:
            outcome.append((state.step, type(error).__name__, state.params))
            break
        state = new_state
    results["failure"] = outcome

    state, step = _setup(group)
    x, y = _data()
    x = x[:4].clone()
    if rank == 0:
        x[2, 0] = math.nan  # a real row on rank 0 only
    try:
        step(state, fdp.Batch((x, y[:4]), torch.ones(4, dtype=torch.bool), shard=(rank, WORLD)))
        results["nonfinite"] = "no error"
    except fdp.NonFiniteError:
        results["nonfinite"] = "NonFiniteError"
    torch.save(results, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: about one run in twenty, a gloo thread still
    # alive there calls std::terminate (SIGABRT) after every result above has been written.
    os._exit(0)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Runs the 2-process scenarios once; their results and rank 0's halfway checkpoint."""
    tmp = tmp_path_factory.mktemp("dist")
    mp.start_processes(
        _worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, start_method="spawn"
    )
    return [torch.load(tmp / f"{rank}.pt") for rank in range(WORLD)], torch.load(
        tmp / "checkpoint.pt"
    )


@pytest.fixture(scope="module")
def ranks(spawned):
    return spawned[0]


@pytest.fixture(scope="module")
def checkpoint(spawned):
    return spawned[1]


def test_two_processes_match_one_process(ranks):
    state, step = _setup()
    single, single_metrics = _train(state, step, rank=0, world=1)
    for result in ranks:
        for name, value in single.params.items():
            torch.testing.assert_close(result["params"][name], value, rtol=0, atol=1e-6)
        assert result["ledger"] == single.ledger
        assert fdp.epsilon(result["ledger"], delta=1e-5) == fdp.epsilon(single.ledger, delta=1e-5)
        for got, want in zip(result["metrics"], single_metrics, strict=True):
            assert got["batch_size"] == want["batch_size"]
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    for name in single.params:  # no drift between the ranks: bit-identical
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])


def test_a_compiled_two_process_step_matches_one_eager_process(ranks):
    state, step = _setup()
    single, _ = _train(state, step, rank=0, world=1)
    for result in ranks:
        compiled = result["compiled"]
        assert compiled.step == STEPS and compiled.ledger == single.ledger
        for name, value in single.params.items():
            torch.testing.assert_close(compiled.params[name], value, rtol=1e-5, atol=1e-5)


def test_noise_is_added_once_with_std_sigma_c(ranks):
    noise = ranks[0]["noise"]
    assert torch.equal(noise, ranks[1]["noise"])
    sd = SIGMA * CLIP
    assert stats.kstest((noise / sd).double().numpy(), "norm").pvalue > 1e-4
    # Variance test with power against sqrt(2) or 1/sqrt(2) times the right std.
    ratio = noise.double().pow(2).mean().item() / sd**2
    assert abs(ratio - 1) < 0.1


def test_a_failing_rank_fails_the_step_on_every_rank(ranks):
    state, _ = _setup()
    for rank, result in enumerate(ranks):
        ((step_index, error, params),) = result["failure"]
        assert step_index == 2
        assert error == ("ValueError" if rank == 1 else "RankFailedError")
    # Both ranks stopped with the same, fully applied, 2-step parameters.
    for name in state.params:
        assert torch.equal(ranks[0]["failure"][0][2][name], ranks[1]["failure"][0][2][name])


def test_a_nonfinite_example_on_one_rank_refuses_the_step_everywhere(ranks):
    assert [r["nonfinite"] for r in ranks] == ["NonFiniteError"] * WORLD


def test_sharded_poisson_batches_cover_each_sampled_example_once():
    key = fdp.random.key(5)
    whole = list(poisson_batches(200, 0.1, key=key, steps=20))
    shards = [
        list(poisson_batches(200, 0.1, key=key, steps=20, rank=r, world_size=3)) for r in range(3)
    ]
    for t, batch in enumerate(whole):
        expected = sorted(batch.indices[batch.mask].tolist())
        got = sorted(i for shard in shards for i in shard[t].indices[shard[t].mask].tolist())
        assert got == expected
    assert len({s[0].indices.shape for s in shards}) == 1  # fixed shapes on every rank


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0)])
def test_bad_shard_is_refused(rank, world_size):
    with pytest.raises(ValueError, match="rank|world_size"):
        poisson_batches(10, 0.5, key=fdp.random.key(0), rank=rank, world_size=world_size)


def test_a_two_process_checkpoint_resumes_on_one_process(checkpoint):
    assert checkpoint.step == STEPS // 2
    state, step = _setup()
    resumed, _ = _train(checkpoint, step, 0, 1, steps=STEPS - STEPS // 2, start=STEPS // 2)
    uninterrupted, _ = _train(state, step, 0, 1)
    for name, value in uninterrupted.params.items():
        torch.testing.assert_close(resumed.params[name], value, rtol=0, atol=1e-6)
    assert resumed.ledger == uninterrupted.ledger

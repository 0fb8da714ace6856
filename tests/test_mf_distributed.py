"""correlated_noise across 2 gloo processes: the same noise on every rank, as in one process;
`fit_correlated` (what `funcdp train --mechanism ...` runs under torchrun) on rank shards."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import funcdp as fdp
from funcdp import datasets, mf
from funcdp.data import PoissonLoader
from funcdp.distributed import broadcast_state
from funcdp.mf.recipe import fit_correlated
from funcdp.recipe import Recipe
from funcdp.transforms import correlated_noise
from tests import gloo

WORLD, N, Q, STEPS = 2, 32, 0.25, 4


def _setup(group=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    strategy = mf.blt(STEPS, 2, min_separation=1)
    privatizer = fdp.chain(
        fdp.clip(0.5),
        fdp.aggregate(),
        correlated_noise(1.0, strategy),
        fdp.normalize(N * Q),
        fdp.account(Q),
    )
    optimizer = fdp.optim.sgd(0.5)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, process_group=group)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(2)
    )
    return state, step


def _train(state, step, rank, world):
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(N, 5, generator=gen), torch.randint(0, 3, (N,), generator=gen)
    loader = PoissonLoader(data, Q, key=fdp.random.key(1), steps=STEPS, rank=rank, world_size=world)
    for batch in loader:
        state, _ = step(state, batch)
    return state


def _worker(rank, init_file, out_dir):
    gloo.join(rank, init_file, WORLD)
    state, step = _setup(dist.group.WORLD)
    final = _train(broadcast_state(state, dist.group.WORLD), step, rank, WORLD)
    torch.save(final.params, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)  # as in test_distributed: skip a teardown in which gloo threads may abort


def test_two_processes_add_the_same_correlated_noise_as_one(tmp_path):
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    state, step = _setup()
    single = _train(state, step, rank=0, world=1)
    for name, value in single.params.items():
        assert torch.equal(ranks[0][name], ranks[1][name])  # bit-identical across ranks
        torch.testing.assert_close(ranks[0][name], value, rtol=0, atol=1e-6)


RECIPE = Recipe(epsilon=3.0, epochs=1, batch_size=128, lr=1.0)


def _fit_worker(rank, init_file, out_dir):
    gloo.join(rank, init_file, WORLD)
    result = fit_correlated(
        datasets.load_digits(), RECIPE, mechanism="bandmf", size=2, process_group=dist.group.WORLD
    )
    torch.save((result.model.state_dict(), result.epsilon), f"{out_dir}/fit{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow  # two spawned processes and three calibrations: about 15-30 s
def test_fit_correlated_on_rank_shards_trains_as_one_process(tmp_path):
    mp.start_processes(
        _fit_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"fit{rank}.pt") for rank in range(WORLD)]
    single = fit_correlated(datasets.load_digits(), RECIPE, mechanism="bandmf", size=2)
    assert ranks[0][1] == ranks[1][1] == single.epsilon <= 3.0
    for name, value in single.model.state_dict().items():
        assert torch.equal(ranks[0][0][name], ranks[1][0][name])
        torch.testing.assert_close(ranks[0][0][name], value, rtol=0, atol=1e-5)

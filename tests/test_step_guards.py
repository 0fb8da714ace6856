"""The train step's guards against misuse that would weaken the guarantee silently.

Each test here failed on the code before these guards: a bare tuple taken as (inputs, mask), a
rank's batch that is not its shard, secure noise across ranks, one key for every micro-batch,
dropout from torch's global generator, a non-integer step, a params dict missing a parameter,
a budget with a ledger of its own, and one noise stream for two devices of one type.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import funcdp as fdp
from funcdp.transforms.base import PER_EXAMPLE, GradientTransformation
from funcdp.transforms.noise import device_key


def _problem(model=None, size=8, noise=1.0, extra=()):
    model = model or nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    privatizer = fdp.chain(
        fdp.clip(1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(noise),
        fdp.normalize(size),
        fdp.account(sample_rate=0.1),
        *extra,
    )
    optimizer = fdp.optim.sgd(0.5)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(3)
    )
    gen = torch.Generator().manual_seed(0)
    batch = fdp.Batch(
        (torch.randn(size, 4, generator=gen), torch.randint(0, 3, (size,), generator=gen)),
        torch.ones(size, dtype=torch.bool),
    )
    return loss_fn, privatizer, optimizer, state, batch


def _equal(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_bare_tuple_is_refused():
    loss_fn, privatizer, optimizer, state, batch = _problem()
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    x, y = batch.inputs
    with pytest.raises(TypeError, match="funcdp.data.Batch"):
        step(state, (x, y > 0))  # y > 0 is bool: it used to be read as a mask


@pytest.mark.parametrize("mode", ["vmap", "ghost"])
def test_dropout_draws_from_the_step_key(mode):
    """Same state and batch, same new state; torch's global generator is left as it was."""
    loss_fn, privatizer, optimizer, state, batch = _problem()
    step = fdp.make_train_step(
        loss_fn, privatizer, optimizer, performance=fdp.Performance(mode=mode)
    )
    before = torch.get_rng_state()
    first, _ = step(state, batch)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(1234)  # another global state changes nothing
    second, _ = step(state, batch)
    assert _equal(first.params, second.params)
    later, _ = step(state._replace(step=1), batch)  # another step, other dropout masks and noise
    assert not _equal(first.params, later.params)


def test_save_and_resume_of_a_dropout_model_is_bit_identical(tmp_path):
    loss_fn, privatizer, optimizer, state, batch = _problem()
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    straight = state
    for _ in range(4):
        straight, _ = step(straight, batch)
    resumed = state
    for _ in range(2):
        resumed, _ = step(resumed, batch)
    torch.save(resumed, tmp_path / "state.pt")
    torch.manual_seed(99)
    resumed = torch.load(tmp_path / "state.pt")
    for _ in range(2):
        resumed, _ = step(resumed, batch)
    assert _equal(straight.params, resumed.params)


@pytest.mark.parametrize("step_value", [1.5, True, torch.tensor(2), -1])
def test_a_non_integer_step_is_refused(step_value):
    loss_fn, privatizer, optimizer, state, batch = _problem()
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    with pytest.raises(ValueError, match="state.step must be an int"):
        step(state._replace(step=step_value), batch)


def test_params_missing_a_parameter_are_refused():
    loss_fn, privatizer, optimizer, state, batch = _problem()
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    params = dict(state.params)
    del params["2.bias"]
    with pytest.raises(ValueError, match=r"missing the trainable parameter\(s\) \['2.bias'\]"):
        step(state._replace(params=params), batch)


def _key_recorder() -> GradientTransformation:
    """A per-example transform that keeps every key it is handed in its state."""

    def update(updates, state, params=None, *, key=None, mask=None):
        return updates, torch.cat([state, key[None]])

    return GradientTransformation(
        lambda params: torch.zeros(0, 2, dtype=torch.int64), update, PER_EXAMPLE, sensitivity=1.0
    )


def test_each_micro_batch_gets_its_own_key():
    loss_fn, _, optimizer, state, batch = _problem()
    privatizer = fdp.chain(fdp.clip(1.0), _key_recorder(), fdp.aggregate(), fdp.gaussian_noise(1.0))
    state = fdp.TrainState.create(
        state.params,
        buffers=state.buffers,
        privatizer=privatizer,
        optimizer=optimizer,
        key=fdp.random.key(0),
    )
    step = fdp.make_train_step(
        loss_fn, privatizer, optimizer, performance=fdp.Performance(mode="vmap", microbatch_size=2)
    )
    new, _ = step(state, batch)
    keys = new.privacy_state[1]
    assert keys.shape == (4, 2)
    assert len({tuple(k.tolist()) for k in keys}) == 4


def test_a_budget_added_to_a_resumed_run_sees_the_epsilon_already_spent():
    loss_fn, privatizer, optimizer, state, batch = _problem()
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    for _ in range(5):
        state, _ = step(state, batch)
    spent = fdp.epsilon(state.ledger, delta=1e-5)
    guarded = fdp.chain(*privatizer.parts, fdp.budget(spent * 1.0001, delta=1e-5))
    resumed = state._replace(privacy_state=(*state.privacy_state, ()))
    guarded_step = fdp.make_train_step(loss_fn, guarded, optimizer)
    with pytest.raises(fdp.BudgetExceededError):
        guarded_step(resumed, batch)


def test_noise_on_two_devices_of_one_type_is_independent():
    key = fdp.random.key(0)
    assert torch.equal(device_key(key, torch.device("cpu")), key)
    keys = [device_key(key, torch.device(f"cuda:{i}")) for i in range(3)]
    assert len({tuple(k.tolist()) for k in keys}) == 3


@pytest.fixture
def one_process_group():
    """A real gloo group of one process (rank 0 of 1)."""
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(os.path.join(folder, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def test_secure_noise_with_a_process_group_is_refused_when_built(one_process_group):
    loss_fn, _, optimizer, _, _ = _problem()
    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0, secure=True))
    with pytest.raises(ValueError, match=r"secure=True\) cannot run with process_group"):
        fdp.make_train_step(loss_fn, privatizer, optimizer, process_group=one_process_group)


def test_a_batch_that_is_not_the_ranks_shard_is_refused(one_process_group):
    loss_fn, privatizer, optimizer, state, batch = _problem()
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, process_group=one_process_group)
    with pytest.raises(ValueError, match=r"batch.shard is None, but this process is rank 0 of 1"):
        step(state, batch)  # a Batch built by hand: not marked as this rank's shard
    with pytest.raises(ValueError, match=r"batch.shard is \(1, 2\)"):
        step(state, batch._replace(shard=(1, 2)))
    step(state, batch._replace(shard=(0, 1)))


def test_a_shard_without_a_process_group_is_refused():
    loss_fn, privatizer, optimizer, state, batch = _problem()
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    with pytest.raises(ValueError, match=r"batch.shard is \(0, 2\).*no process_group"):
        step(state, batch._replace(shard=(0, 2)))
    step(state, batch._replace(shard=(0, 1)))


def test_poisson_loader_marks_its_shard():
    x = torch.randn(50, 4)
    loader = fdp.PoissonLoader((x,), 0.2, key=fdp.random.key(0), steps=1, rank=1, world_size=2)
    (batch,) = list(loader)
    assert batch.shard == (1, 2)


@pytest.mark.parametrize("mode", ["vmap", "ghost"])
def test_clipped_fraction_counts_factors_below_one(mode):
    """Per-layer clipping: an example can have one layer cut while its whole norm stays below
    the sensitivity sqrt(sum C_g^2); the metric counts the factors, not the total norm."""
    model = nn.Linear(4, 1)
    apply_fn, params, buffers = fdp.functionalize(model)
    with torch.no_grad():
        params["weight"].zero_()
        params["bias"].zero_()

    def loss_fn(params, buffers, x, y):  # gradient: weight x * y, bias y
        return (apply_fn(params, buffers, x[None]) * y).sum()

    clip = fdp.clip_per_layer({"weight": 1.0, "bias": 10.0})  # sensitivity sqrt(101)
    privatizer = fdp.chain(clip, fdp.aggregate(), fdp.gaussian_noise(0.0), fdp.normalize(2.0))
    optimizer = fdp.optim.sgd(0.1)
    step = fdp.make_train_step(
        loss_fn, privatizer, optimizer, performance=fdp.Performance(mode=mode)
    )
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]])  # weight norms 3 and 0.1
    y = torch.ones(2)
    _, metrics = step(state, fdp.Batch((x, y), torch.ones(2, dtype=torch.bool)))
    assert metrics["grad_norm"] < clip.sensitivity  # no total norm is above the sensitivity
    assert metrics["clipped_fraction"] == 0.5  # but the first example's weight was cut


def test_a_compiled_dropout_step_is_pure():
    """Compiled (aot_eager here; inductor checked by hand), random layers draw from torch's
    generators, seeded from the step key for the step: same state and batch, same result."""
    loss_fn, privatizer, optimizer, state, batch = _problem()
    performance = fdp.Performance(mode="ghost", compile={"backend": "aot_eager"})
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, performance=performance)
    first, _ = step(state, batch)
    torch.manual_seed(5)
    second, _ = step(state, batch)
    later, _ = step(state._replace(step=1), batch)
    assert _equal(first.params, second.params)
    assert not _equal(first.params, later.params)

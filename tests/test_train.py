"""Tests for funcdp/train.py: TrainState, make_train_step, make_eval_step (and to_module)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcdp as fdp
from funcdp import optim
from funcdp.data import Batch, PoissonLoader
from funcdp.tree import tree_clone, tree_leaves

Q, N = 0.25, 16  # sample rate and data set size: expected batch size 4
EXPECTED = Q * N


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()  # BatchNorm in eval mode reads its buffers and mixes no examples


def _setup(
    noise=1.0,
    max_norm=1.0,
    optimizer=None,
    extra=(),
    on_nonfinite="raise",
    performance=fdp.Performance(),
    model=None,
):
    model = model or _model()
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    privatizer = fdp.chain(
        fdp.clip(max_norm),
        fdp.aggregate(),
        fdp.gaussian_noise(noise),
        fdp.normalize(EXPECTED),
        fdp.account(Q),
        *extra,
    )
    optimizer = optimizer or optim.sgd(0.5)
    step = fdp.make_train_step(
        loss_fn, privatizer, optimizer, on_nonfinite=on_nonfinite, performance=performance
    )
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    return model, apply_fn, loss_fn, state, step


def _data(n=N, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def _batch(rows=6, real=4, seed=1):
    x, y = _data(rows, seed)
    return Batch((x, y), torch.arange(rows) < real)


def _assert_states_equal(a, b):
    leaves_a, leaves_b = tree_leaves(a), tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def _states_equal(a, b) -> bool:
    try:
        _assert_states_equal(a, b)
    except AssertionError:
        return False
    return True


# ---------------------------------------------------------------- the update formula


@pytest.mark.parametrize("max_norm", [1e6, 0.3])
def test_noiseless_step_is_sgd_on_clipped_sum_over_expected_size(max_norm):
    _, _, loss_fn, state, step = _setup(noise=0.0, max_norm=max_norm)
    batch = _batch(rows=6, real=3)  # realised size 3, expected size 4: the formula tells them apart
    new_state, metrics = step(state, batch)
    # Reference: each real example's gradient by plain autograd, clipped by hand.
    total = {name: torch.zeros_like(p) for name, p in state.params.items()}
    clipped = 0
    for i in range(3):
        params = {n: p.clone().requires_grad_(True) for n, p in state.params.items()}
        loss = loss_fn(params, state.buffers, batch.inputs[0][i], batch.inputs[1][i])
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        factor = min(1.0, max_norm / float(norm))
        clipped += factor < 1.0
        for name in total:
            total[name] += factor * grads[name]
    for name, p in state.params.items():
        expected = p - 0.5 * total[name] / EXPECTED
        torch.testing.assert_close(new_state.params[name], expected, atol=1e-6, rtol=0)
    assert (clipped > 0) == (max_norm < 1.0)  # the small clip really clips
    assert metrics["clipped_fraction"] == pytest.approx(clipped / 3)
    assert new_state.step == 1 and new_state.ledger.steps == 1


def test_metrics_on_a_hand_made_example():
    def loss_fn(params, buffers, x, y):
        return 0.5 * (params["w"] @ x - y) ** 2  # gradient at w = 0: -y * x

    privatizer = fdp.chain(
        fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(0.0), fdp.normalize(4.0), fdp.account(Q)
    )
    optimizer = optim.sgd(1.0)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    state = fdp.TrainState.create(
        {"w": torch.zeros(2)}, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [5.0, 5.0]])
    y = torch.tensor([0.5, 2.0, 3.0, 100.0])  # gradient norms 0.5, 2, 3; the last row is padding
    new_state, metrics = step(state, Batch((x, y), torch.tensor([True, True, True, False])))
    assert metrics["loss"] == pytest.approx(0.5 * (0.25 + 4.0 + 9.0) / 3)
    assert metrics["clipped_fraction"] == pytest.approx(2 / 3)
    assert metrics["grad_norm"] == pytest.approx((0.5 + 2.0 + 3.0) / 3)
    assert metrics["batch_size"] == 3 and metrics["skipped"] is False
    # Clipped gradients (-0.5, 0), (0, -1), (-0.6, -0.8); sum / 4, times -lr.
    torch.testing.assert_close(new_state.params["w"], torch.tensor([0.275, 0.45]))


@pytest.mark.parametrize(
    "performance",
    [
        fdp.Performance(microbatch_size=3),
        fdp.Performance(chunk_size=4),
        fdp.Performance(microbatch_size=4, chunk_size=2),
    ],
)
def test_microbatches_and_chunks_match_the_plain_step_with_noise(performance):
    *_, state, plain = _setup(noise=1.0)
    *_, _, split = _setup(noise=1.0, performance=performance)
    a = b = state
    for seed in range(3):
        batch = _batch(rows=10, real=8, seed=seed)
        a, metrics_a = plain(a, batch)
        b, metrics_b = split(b, batch)
        assert metrics_a["loss"] == pytest.approx(metrics_b["loss"], rel=1e-6)
    for name in a.params:
        torch.testing.assert_close(a.params[name], b.params[name], atol=1e-6, rtol=0)
    assert a.ledger == b.ledger == fdp.Ledger().record(1.0, Q, 3)  # noise and account once a batch
    assert not torch.allclose(a.params["3.weight"], state.params["3.weight"])


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda: optim.adam(1e-2), lambda: optim.from_torch(torch.optim.Adam, lr=1e-2)],
    ids=["adam", "from_torch"],
)
def test_save_load_resume_is_bit_identical(tmp_path, make_optimizer):
    extra = (fdp.budget(max_epsilon=100.0, delta=1e-5),)
    *_, state0, step = _setup(noise=1.0, optimizer=make_optimizer(), extra=extra)
    data, key = _data(), fdp.random.key(7)
    uninterrupted = state0
    for batch in PoissonLoader(data, Q, key=key, steps=6):
        uninterrupted, _ = step(uninterrupted, batch)

    state = state0
    for batch in PoissonLoader(data, Q, key=key, steps=3):
        state, _ = step(state, batch)
    torch.save(state, tmp_path / "state.pt")
    del state
    state = torch.load(tmp_path / "state.pt")  # weights_only=True, the default
    assert isinstance(state, fdp.TrainState) and state.step == 3
    *_, _, fresh_step = _setup(noise=1.0, optimizer=make_optimizer(), extra=extra)
    for batch in PoissonLoader(data, Q, key=key, steps=3, start=state.step):
        state, _ = fresh_step(state, batch)

    _assert_states_equal(state, uninterrupted)
    assert state.ledger == uninterrupted.ledger and state.ledger.steps == 6
    assert fdp.epsilon(state.ledger, delta=1e-5) == fdp.epsilon(uninterrupted.ledger, delta=1e-5)


# ---------------------------------------------------------------- refused input


@pytest.mark.parametrize(
    "make_batch,match",
    [
        (lambda b: Batch(b.inputs, b.mask[:-1]), "mask must have shape"),
        (lambda b: Batch(b.inputs, torch.cat([b.mask, b.mask])), "mask must have shape"),
        (lambda b: Batch(b.inputs, b.mask.int()), "mask must be a bool"),
        (lambda b: Batch(b.inputs, b.mask.float()), "mask must be a bool"),
        (lambda b: Batch((b.inputs[0], b.inputs[1][:-1]), b.mask), r"inputs\[1\]"),
        (lambda b: Batch((b.inputs[0][:3], b.inputs[1]), b.mask), "mask"),
        (lambda b: Batch(b.inputs, b.mask, bucket_size=0), "bucket_size"),
        (lambda b: Batch(b.inputs, b.mask, bucket_size=2.5), "bucket_size"),
    ],
)
def test_bad_batch_raises_and_changes_nothing(make_batch, match):
    *_, state, step = _setup()
    snapshot = tree_clone(state)
    with pytest.raises(ValueError, match=match):
        step(state, make_batch(_batch()))
    _assert_states_equal(state, snapshot)


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_nonfinite_real_row_raises_or_skips(microbatch_size):
    batch = _batch(rows=6, real=4)
    batch.inputs[0][3, 1] = math.nan  # a real row, in the last micro-batch when split by 2
    performance = fdp.Performance(microbatch_size=microbatch_size)
    *_, state, raising = _setup(performance=performance)
    *_, _, skipping = _setup(performance=performance, on_nonfinite="skip")
    state, _ = raising(state, _batch(seed=5))  # a step taken, so the state holds a ledger record
    snapshot = tree_clone(state)
    with pytest.raises(fdp.NonFiniteError):
        raising(state, batch)
    _assert_states_equal(state, snapshot)
    new_state, metrics = skipping(state, batch)
    assert metrics["skipped"] is True
    _assert_states_equal(new_state, snapshot)
    _assert_states_equal(state, snapshot)
    assert new_state.step == 1 and new_state.ledger.steps == 1


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_nonfinite_real_row_contributes_zero_in_zero_mode(microbatch_size):
    performance = fdp.Performance(microbatch_size=microbatch_size)
    *_, state, step = _setup(noise=1.0, performance=performance, on_nonfinite="zero")
    dirty = _batch(rows=6, real=4)
    dirty.inputs[0][1, 0] = math.nan
    # The same batch with that row dropped from the mask: noise and normalization are the same.
    dropped = Batch(dirty.inputs, dirty.mask & (torch.arange(6) != 1))
    actual, metrics = step(state, dirty)
    expected, expected_metrics = step(state, dropped)
    _assert_states_equal(actual, expected)
    assert metrics["nonfinite"] == 1 and expected_metrics["nonfinite"] == 0
    assert metrics["batch_size"] == 4 and metrics["loss"] == expected_metrics["loss"]
    assert actual.ledger.steps == 1 and all(torch.isfinite(p).all() for p in actual.params.values())


def test_nonfinite_padded_row_changes_nothing():
    *_, state, step = _setup(noise=1.0)
    clean = _batch(rows=6, real=4)
    dirty = Batch(tuple(x.clone() for x in clean.inputs), clean.mask)
    dirty.inputs[0][4] = math.nan
    dirty.inputs[0][5] = math.inf
    expected, expected_metrics = step(state, clean)
    actual, metrics = step(state, dirty)
    _assert_states_equal(actual, expected)
    assert metrics == expected_metrics and math.isfinite(metrics["loss"])


# ---------------------------------------------------------------- empty batches, purity, noise


def test_empty_batch_adds_noise_is_accounted_and_advances():
    *_, state, step = _setup(noise=1.0)
    x, y = _data(4)
    new_state, metrics = step(state, Batch((x, y), torch.zeros(4, dtype=torch.bool)))
    assert metrics["batch_size"] == 0 and metrics["loss"] == 0.0
    assert all(not torch.equal(new_state.params[n], p) for n, p in state.params.items())
    assert new_state.ledger.steps == 1 and new_state.step == 1


def test_step_is_pure_and_noise_depends_on_step_and_key():
    *_, state, step = _setup(noise=1.0)
    batch = _batch()
    snapshot = tree_clone(state)
    first, metrics_first = step(state, batch)
    second, metrics_second = step(state, batch)
    _assert_states_equal(first, second)
    assert metrics_first == metrics_second
    _assert_states_equal(state, snapshot)
    later, _ = step(state._replace(step=5), batch)
    other_key, _ = step(state._replace(key=fdp.random.key(1)), batch)
    for name in state.params:
        assert not torch.equal(later.params[name], first.params[name])
        assert not torch.equal(other_key.params[name], first.params[name])


# ---------------------------------------------------------------- budget, ledger, eval, to_module


def test_budget_refuses_the_step_that_would_exceed_it():
    spent = [
        fdp.dpsgd_epsilon(noise_multiplier=1.0, sample_rate=Q, steps=t, delta=1e-5) for t in (2, 3)
    ]
    max_epsilon = (spent[0] + spent[1]) / 2
    *_, state, step = _setup(noise=1.0, extra=(fdp.budget(max_epsilon, delta=1e-5),))
    for seed in range(2):
        state, _ = step(state, _batch(seed=seed))
    snapshot = tree_clone(state)
    with pytest.raises(fdp.BudgetExceededError, match="epsilon"):
        step(state, _batch(seed=2))
    _assert_states_equal(state, snapshot)
    assert state.step == 2 and state.ledger.steps == 2
    assert fdp.epsilon(state.ledger, delta=1e-5) == spent[0] < max_epsilon


def test_ledger_needs_exactly_one_account():
    model = _model()
    _, params, buffers = fdp.functionalize(model)
    for privatizer in (
        fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0)),
        fdp.chain(
            fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0), fdp.account(Q), fdp.account(Q)
        ),
    ):
        state = fdp.TrainState.create(
            params,
            buffers=buffers,
            privatizer=privatizer,
            optimizer=optim.sgd(0.1),
            key=fdp.random.key(0),
        )
        with pytest.raises(ValueError, match="account"):
            _ = state.ledger


def test_make_train_step_rejects_bad_configuration():
    _, _, loss_fn, _, _ = _setup()
    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0))
    with pytest.raises(ValueError, match="on_nonfinite"):
        fdp.make_train_step(loss_fn, privatizer, optim.sgd(0.1), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="microbatch_size"):
        fdp.make_train_step(
            loss_fn, privatizer, optim.sgd(0.1), performance=fdp.Performance(microbatch_size=0)
        )
    with pytest.raises(ValueError, match="aggregate"):
        fdp.make_train_step(loss_fn, fdp.chain(fdp.clip(1.0)), optim.sgd(0.1))


def test_eval_step_takes_masked_means():
    _, apply_fn, _, state, _ = _setup()

    def metric_fn(params, buffers, x, y):
        logits = apply_fn(params, buffers, x[None])
        return {
            "loss": F.cross_entropy(logits, y[None]),
            "accuracy": (logits.argmax(-1) == y).float()[0],
        }

    batch = _batch(rows=7, real=5)
    batch.inputs[0][6] = math.nan  # garbage in a padded row is ignored
    logits = apply_fn(state.params, state.buffers, batch.inputs[0][:5])
    expected_loss = F.cross_entropy(logits, batch.inputs[1][:5]).item()
    expected_accuracy = (logits.argmax(-1) == batch.inputs[1][:5]).float().mean().item()
    values = fdp.make_eval_step(metric_fn, chunk_size=3)(state, batch)
    assert values["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert values["accuracy"] == pytest.approx(expected_accuracy)

    def scalar_fn(params, buffers, x, y):
        return metric_fn(params, buffers, x, y)["loss"]

    assert fdp.make_eval_step(scalar_fn)(state, batch) == pytest.approx(
        {"loss": expected_loss}, rel=1e-5
    )


def test_to_module_round_trip():
    model, apply_fn, _, state, step = _setup()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for seed in range(2):
        state, _ = step(state, _batch(seed=seed))
    trained = fdp.to_module(model, state)
    assert trained is not model
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name])  # the input module is untouched
    own = trained.state_dict()
    for name, value in {**state.buffers, **state.params}.items():
        assert torch.equal(own[name], value)
    x, _ = _data(5)
    with torch.no_grad():
        assert torch.equal(trained(x), apply_fn(state.params, state.buffers, x))
    _, params_again, buffers_again = fdp.functionalize(trained)
    _assert_states_equal((params_again, buffers_again), (state.params, state.buffers))
    with pytest.raises(ValueError, match="does not have"):
        fdp.to_module(model, state._replace(params={**state.params, "extra": torch.zeros(1)}))


# ---------------------------------------------------------------- ghost mode


def _ghost_pair(clip, on_nonfinite="raise", performance=fdp.Performance()):
    """The same DP step built in vmap and in ghost mode, with a fresh state for each."""
    model = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    privatizer = fdp.chain(
        clip, fdp.aggregate(), fdp.gaussian_noise(1.0), fdp.normalize(EXPECTED), fdp.account(Q)
    )
    optimizer = optim.sgd(0.5, momentum=0.9)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(3)
    )
    steps = {
        mode: fdp.make_train_step(
            loss_fn,
            privatizer,
            optimizer,
            on_nonfinite=on_nonfinite,
            performance=performance._replace(mode=mode),
        )
        for mode in ("vmap", "ghost", "auto")
    }
    return state, steps


@pytest.mark.parametrize(
    "clip",
    [
        fdp.clip(0.5),
        fdp.clip_per_layer(
            {
                "0.weight": 0.3,
                "0.bias": 0.1,
                "1.weight": 0.2,
                "1.bias": 0.2,
                "3.weight": 0.4,
                "3.bias": 0.1,
            }
        ),
        fdp.normalize_per_example(1.0, 0.01),
    ],
    ids=["flat", "per_layer", "automatic"],
)
def test_ghost_mode_matches_vmap_mode_with_noise(clip):
    state, steps = _ghost_pair(clip)
    results = {}
    for mode, step in steps.items():
        current = state
        for seed in range(3):
            batch = _batch(rows=8, real=6, seed=seed)
            batch.inputs[0][7] = math.nan  # a padded row
            current, metrics = step(current, batch)
        results[mode] = (current, metrics)
    (vmap_state, vmap_metrics), (ghost_state, ghost_metrics) = results["vmap"], results["ghost"]
    for name, value in vmap_state.params.items():
        torch.testing.assert_close(ghost_state.params[name], value, rtol=1e-5, atol=1e-6)
    assert ghost_state.ledger == vmap_state.ledger
    assert ghost_metrics["loss"] == pytest.approx(vmap_metrics["loss"], rel=1e-6)
    assert ghost_metrics["grad_norm"] == pytest.approx(vmap_metrics["grad_norm"], rel=1e-5)


def test_ghost_mode_drops_a_nonfinite_example_like_vmap_mode():
    state, steps = _ghost_pair(fdp.clip(0.5), on_nonfinite="zero")
    batch = _batch(rows=6, real=4)
    batch.inputs[0][1, 0] = math.nan
    (vmap_state, vmap_metrics), (ghost_state, ghost_metrics) = (
        steps[mode](state, batch) for mode in ("vmap", "ghost")
    )
    assert ghost_metrics["nonfinite"] == vmap_metrics["nonfinite"] == 1
    for name, value in vmap_state.params.items():
        torch.testing.assert_close(ghost_state.params[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "privatizer, kwargs",
    [
        (
            fdp.chain(
                fdp.adaptive_clip(1.0, count_noise_multiplier=5.0, expected_batch_size=4),
                fdp.aggregate(),
                fdp.gaussian_noise(1.0),
            ),
            {},
        ),
        (fdp.chain(fdp.clip(1.0), fdp.aggregate()), {"mode": "bogus"}),
    ],
    ids=["adaptive", "unknown_mode"],
)
def test_ghost_mode_refuses_what_it_cannot_do_when_built(privatizer, kwargs):
    performance = fdp.Performance(**{"mode": "ghost", **kwargs})
    with pytest.raises(ValueError, match="ghost|mode"):
        fdp.make_train_step(
            lambda p, b, x: x.sum(), privatizer, optim.sgd(0.1), performance=performance
        )


def _count_ghost(probes: list, kwargs) -> None:
    """Counts ghost clipping's probes (the vmap engine's probe, for its rounding check, not)."""
    if not kwargs.get("vmap_all"):
        probes.append(1)


def test_default_mode_takes_ghost_where_it_can_and_probes_once_per_batch_shape(monkeypatch):
    import funcdp.ghost.capture as capture

    probes, original = [], capture.plan
    monkeypatch.setattr(
        capture, "plan", lambda *a, **k: _count_ghost(probes, k) or original(*a, **k)
    )
    state, steps = _ghost_pair(fdp.clip(0.5))
    vmap_state = auto_state = state
    for seed in range(3):
        batch = _batch(rows=8, real=6, seed=seed)
        vmap_state, _ = steps["vmap"](vmap_state, batch)
        auto_state, _ = steps["auto"](auto_state, batch)
    assert len(probes) == 1  # ghost clipping ran, and probed the model once
    for name, value in vmap_state.params.items():
        torch.testing.assert_close(auto_state.params[name], value, rtol=1e-5, atol=1e-6)
    steps["auto"](auto_state, _batch(rows=5, real=5, seed=4))
    assert len(probes) == 1  # the probe reads one example: the batch size does not matter


def test_default_mode_takes_ghost_with_auto_chunks(monkeypatch):
    import funcdp.ghost.capture as capture

    probes, original = [], capture.plan
    monkeypatch.setattr(
        capture, "plan", lambda *a, **k: _count_ghost(probes, k) or original(*a, **k)
    )
    state, steps = _ghost_pair(
        fdp.clip(0.5), performance=fdp.Performance(chunk_size=fdp.AutoChunk(budget_bytes=1))
    )
    batch = _batch(rows=8, real=6)
    auto_state, _ = steps["auto"](state, batch)
    vmap_state, _ = steps["vmap"](state, batch)  # chunks of one example
    assert len(probes) == 1
    for name, value in vmap_state.params.items():
        torch.testing.assert_close(auto_state.params[name], value, rtol=1e-5, atol=1e-6)


def test_default_mode_takes_ghost_under_autocast(monkeypatch):
    import funcdp.ghost.capture as capture

    probes, original = [], capture.plan
    monkeypatch.setattr(
        capture, "plan", lambda *a, **k: _count_ghost(probes, k) or original(*a, **k)
    )
    state, half_steps = _ghost_pair(
        fdp.clip(0.5), performance=fdp.Performance(autocast_dtype=torch.bfloat16)
    )
    _, float_steps = _ghost_pair(fdp.clip(0.5))
    batch = _batch(rows=8, real=6)
    half_state, _ = half_steps["auto"](state, batch)
    assert len(probes) == 1
    float_state, _ = float_steps["vmap"](state, batch)
    half_vmap_state, _ = half_steps["vmap"](state, batch)  # the model has a LayerNorm
    for half in (half_state, half_vmap_state):  # bf16 arithmetic: close to float32, not equal
        for name, p in half.params.items():
            gap = torch.linalg.vector_norm(p - float_state.params[name])
            change = torch.linalg.vector_norm(float_state.params[name] - state.params[name])
            assert 0 < gap <= 0.05 * change, name


def test_default_mode_takes_vmap_where_ghost_cannot_go(monkeypatch):
    import funcdp.ghost.capture as capture

    def plan(*args, **kwargs):
        if not kwargs.get("vmap_all"):  # the vmap engine's own probe may run
            pytest.fail("ghost clipping ran")
        return original(*args, **kwargs)

    original = capture.plan
    monkeypatch.setattr(capture, "plan", plan)
    model = nn.Sequential(nn.Linear(3, 2))
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    clip = fdp.adaptive_clip(0.5, count_noise_multiplier=5.0, expected_batch_size=4)
    privatizer = fdp.chain(clip, fdp.aggregate(), fdp.gaussian_noise(1.0), fdp.account(Q))
    optimizer = optim.sgd(0.5)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(3)
    )
    new_state, _ = step(state, _batch(rows=4, real=3))
    assert new_state.step == 1


def test_micro_batches_of_padding_only_are_not_computed():
    """Padding costs nothing: an eager step computes micro-batches of the real rows only (the
    loss is row-free), with the same new state."""
    model = nn.Sequential(nn.Linear(3, 2))
    apply_fn, params, buffers = fdp.functionalize(model)
    calls = []

    def loss_fn(params, buffers, x, y):
        calls.append(x.shape)
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    privatizer = fdp.chain(fdp.clip(0.5), fdp.aggregate(), fdp.gaussian_noise(1.0))
    optimizer = optim.sgd(0.5)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(3)
    )
    batch = _batch(rows=12, real=5)
    whole = fdp.make_train_step(
        loss_fn, privatizer, optimizer, performance=fdp.Performance(mode="vmap")
    )
    expected, expected_metrics = whole(state, batch)
    micro = fdp.make_train_step(
        loss_fn, privatizer, optimizer, performance=fdp.Performance(mode="vmap", microbatch_size=4)
    )
    micro(state, batch)  # its probe (for the rounding check) runs on the first call only
    calls.clear()
    new, metrics = micro(state, batch)
    assert len(calls) == 2  # the real rows 0-3, then 4
    assert metrics["batch_size"] == expected_metrics["batch_size"] == 5
    for name, value in expected.params.items():
        torch.testing.assert_close(new.params[name], value, rtol=1e-6, atol=1e-7)
    empty = fdp.Batch(batch.inputs, torch.zeros(12, dtype=torch.bool))
    calls.clear()
    new, metrics = micro(state, empty)  # noise is still added, from the first micro-batch's zero
    assert len(calls) == 1 and metrics["batch_size"] == 0 and new.step == 1
    assert any(not torch.equal(new.params[k], state.params[k]) for k in state.params)


@pytest.mark.parametrize(
    "microbatch_size,bucket_size,real,eager,compiled",
    [
        (4, None, 10, [4, 4, 2], [4, 4, 4]),  # compiled, the last piece padded to 4 rows
        (None, 5, 7, [7], [5, 5]),
        (None, 5, 3, [3], [5]),  # compiled, the second bucket is padding only
        (8, 5, 10, [8, 2], [5, 5]),  # compiled, the smaller of the two
        (3, 5, 10, [3, 3, 3, 2], [3, 3, 3, 3]),  # eager, a lone row computed as two
        (None, 5, 1, [2], [5]),
        (1, 5, 3, [1, 1, 1], [1, 1, 1]),  # every piece has one row
        (None, 5, 0, [2], [5]),  # no real row: masked rows (one bucket) for the zero sum
    ],
)
@pytest.mark.parametrize("compile", [False, True])
def test_a_batch_is_computed_on_its_real_rows_eager_and_in_pieces_of_one_shape_compiled(
    monkeypatch, microbatch_size, bucket_size, real, eager, compiled, compile
):
    """Eager, the engine sees the real rows only (padding costs nothing; a piece of one row is
    computed as two, `funcdp._local_sum`); compiled, every piece has one shape, so that one
    graph serves them all (compilation itself is stubbed out here). Either way the new state is
    the whole batch's."""
    import funcdp._local_sum as local_sum

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # row-free, unlike _model
    *_, state, whole = _setup(performance=fdp.Performance(mode="vmap"), model=model)
    batch = _batch(rows=10, real=real)
    expected, expected_metrics = whole(state, batch)
    shapes, masks = _record_pieces(monkeypatch)
    if compile:
        monkeypatch.setattr(local_sum, "_compiled", lambda fn, options: fn)
        monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)  # the optimizer's
    performance = fdp.Performance(mode="vmap", microbatch_size=microbatch_size, compile=compile)
    *_, _, step = _setup(performance=performance, model=model)
    new, metrics = step(state, Batch(batch.inputs, batch.mask, bucket_size=bucket_size))
    assert shapes == (compiled if compile else eager)
    assert int(torch.cat(masks).sum()) == real  # eager: no padded row but a lone row's copy
    assert metrics["batch_size"] == expected_metrics["batch_size"] == real
    for name, value in expected.params.items():
        torch.testing.assert_close(new.params[name], value, rtol=1e-6, atol=1e-7)


def _record_pieces(monkeypatch) -> tuple[list[int], list[torch.Tensor]]:
    """The sizes and masks of the pieces that the engines of steps built from now on compute."""
    import funcdp._local_sum as local_sum

    shapes, masks = [], []
    make_engine = local_sum.make_engine

    def recording(*args, **kwargs):
        engine = make_engine(*args, **kwargs)

        def run(params, buffers, inputs, mask, *rest):
            shapes.append(mask.shape[0])
            masks.append(mask)
            assert all(x.shape[0] == mask.shape[0] for x in inputs)
            return engine(params, buffers, inputs, mask, *rest)

        return run

    monkeypatch.setattr(local_sum, "make_engine", recording)
    return shapes, masks


@pytest.mark.parametrize("mode", ["vmap", "auto"])
def test_an_eager_step_keeps_pieces_of_one_shape_where_gradients_are_not_row_free(
    monkeypatch, mode
):
    """A weight used twice takes vmap's per-example gradient, which the row check does not
    cover (`capture.row_free`): the eager step computes whole buckets, padding included."""

    def loss_fn(params, buffers, x, y):
        hidden = torch.tanh(F.linear(x, params["w"]))
        return F.cross_entropy(F.linear(hidden, params["w"])[None], y[None])

    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0))
    optimizer = optim.sgd(0.5)
    state = fdp.TrainState.create(
        {"w": torch.randn(3, 3)}, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    shapes, masks = _record_pieces(monkeypatch)
    step = fdp.make_train_step(
        loss_fn, privatizer, optimizer, performance=fdp.Performance(mode=mode)
    )
    batch = _batch(rows=10, real=7)
    _, metrics = step(state, Batch(batch.inputs, batch.mask, bucket_size=5))
    assert shapes == [5, 5] and not bool(torch.cat(masks).all())
    assert metrics["batch_size"] == 7


def _raised_by_step(model, privatizer, mode="auto", loss_body=None):
    """The exception one step raises on `_batch()` for `model` (the loss: cross-entropy of its
    output, or `loss_body(out, y)`)."""
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        out = apply_fn(params, buffers, x[None])
        return loss_body(out, y) if loss_body else F.cross_entropy(out, y[None])

    optimizer = optim.sgd(0.1)
    performance = fdp.Performance(mode=mode)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, performance=performance)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    with pytest.raises(Exception) as caught:
        step(state, _batch())
    return caught.value


def _branching_loss(out, y):
    if out.sum() > 0:  # data-dependent control flow: vmap cannot branch per example
        out = -out
    return F.cross_entropy(out, y[None])


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
@pytest.mark.parametrize("mode", ["vmap", "ghost"])
def test_an_error_in_the_loss_names_the_line_and_says_what_to_do(mode):
    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate())
    error = _raised_by_step(nn.Linear(3, 2), privatizer, mode, _branching_loss)
    assert isinstance(error, RuntimeError)
    (note,) = error.__notes__
    line = _branching_loss.__code__.co_firstlineno + 1  # the `if`
    assert f"test_train.py:{line} in _branching_loss" in note
    assert "data-dependent Python control flow" in note


def test_funcdp_errors_get_no_note():
    wrong = fdp.clip_by(lambda norms: norms[:, 0], 1.0)  # factors [B], not [B, G]
    error = _raised_by_step(nn.Linear(3, 2), fdp.chain(wrong, fdp.aggregate()))
    assert isinstance(error, ValueError) and "factor_fn must return" in str(error)
    assert not getattr(error, "__notes__", [])


class _ItemInForward(nn.Module):
    """A layer whose forward reads a tensor's value in Python, which vmap cannot do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        scale = 2.0 if x.sum().item() > 0 else 1.0
        return self.fc(x) * scale


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_an_error_in_a_module_names_the_module_and_its_line():
    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate())
    error = _raised_by_step(nn.Sequential(_ItemInForward()), privatizer, "vmap")
    assert isinstance(error, RuntimeError)
    (note,) = error.__notes__
    line = _ItemInForward.forward.__code__.co_firstlineno + 1
    assert "inside test_train._ItemInForward" in note
    assert f"test_train.py:{line} in forward" in note and ".item()" in note


def test_eval_step_runs_dropout_in_training_mode_purely_and_per_example():
    model = nn.Sequential(nn.Dropout(p=0.5))  # training mode: dropout is live
    apply_fn, params, buffers = fdp.functionalize(model)

    def metric_fn(params, buffers, x):
        kept = (apply_fn(params, buffers, x[None]) != 0).float().mean()
        return {"kept": kept, "kept_squared": kept**2}

    rows = 8
    batch = Batch((torch.ones(rows, 1000),), torch.ones(rows, dtype=torch.bool))
    state = fdp.TrainState(params, buffers, None, None, fdp.random.key(0), 0)
    evaluate = fdp.make_eval_step(metric_fn, chunk_size=3)
    rng = torch.get_rng_state()
    first = evaluate(state, batch)
    assert torch.equal(torch.get_rng_state(), rng)  # torch's generator is left as it was
    assert evaluate(state, batch) == first  # the same state and batch: the same metrics
    assert evaluate(state._replace(step=1), batch) != first  # the key moves with the step
    # 8000 Bernoulli(1/2) draws: the mean is within 6 standard deviations (0.0056) of 1/2.
    assert abs(first["kept"] - 0.5) < 0.034
    # Each example draws its own mask: the kept fractions differ across identical rows.
    assert first["kept_squared"] - first["kept"] ** 2 > 1e-6
    model.eval()  # eval mode: no dropout, deterministic
    assert evaluate(state, batch) == {"kept": 1.0, "kept_squared": 1.0}

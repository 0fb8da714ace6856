"""Tests for funcdp/optim.py: functional optimizers against torch.optim, and the adapter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from funcdp import optim
from funcdp.tree import tree_clone, tree_leaves

STEPS = 6


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "layer.bias": torch.randn(4, generator=gen, dtype=torch.float64),
    }


def _grads(steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "layer.weight": torch.randn(4, 3, generator=gen, dtype=torch.float64),
            "layer.bias": torch.randn(4, generator=gen, dtype=torch.float64),
        }
        for _ in range(steps)
    ]


def _run_funcdp(transform, params, grads):
    state = transform.init(params)
    for g in grads:
        updates, state = transform.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def _run_torch(make_optimizer, params, grads, make_scheduler=None):
    names = sorted(params)
    tensors = {n: params[n].clone().requires_grad_(True) for n in names}
    optimizer = make_optimizer([tensors[n] for n in names])
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    for g in grads:
        for n in names:
            tensors[n].grad = g[n].clone()
        optimizer.step()
        if scheduler:
            scheduler.step()
    return {n: t.detach() for n, t in tensors.items()}


def _assert_trees_close(a, b, atol=1e-6):
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)


CASES = [
    (lambda: optim.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (lambda: optim.sgd(0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (
        lambda: optim.momentum(0.05, beta=0.8, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
    ),
    (lambda: optim.momentum(0.05), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    (lambda: optim.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    (
        lambda: optim.adam(3e-2, b1=0.8, b2=0.99, eps=1e-6),
        lambda p: torch.optim.Adam(p, lr=3e-2, betas=(0.8, 0.99), eps=1e-6),
    ),
    (
        lambda: optim.adamw(1e-2, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ),
    (lambda: optim.adamw(1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2)),
]


CASE_IDS = [
    "sgd",
    "momentum",
    "nesterov",
    "momentum-default",
    "adam",
    "adam-betas",
    "adamw",
    "adamw-default",
]


@pytest.mark.parametrize("make_transform,make_optimizer", CASES, ids=CASE_IDS)
def test_matches_torch_optim(make_transform, make_optimizer):
    params, grads = _params(), _grads()
    ours, _ = _run_funcdp(make_transform(), params, grads)
    theirs = _run_torch(make_optimizer, params, grads)
    _assert_trees_close(ours, theirs)
    # The run actually moved the parameters (a no-op optimizer would fail above only by luck).
    assert not torch.allclose(ours["layer.weight"], params["layer.weight"])


@pytest.mark.parametrize(
    "make_transform,make_optimizer", CASES[:2] + CASES[4:5], ids=["sgd", "momentum", "adam"]
)
def test_matches_torch_optim_in_float32(make_transform, make_optimizer):
    params = {n: p.float() for n, p in _params().items()}
    grads = [{n: g.float() for n, g in step.items()} for step in _grads()]
    ours, _ = _run_funcdp(make_transform(), params, grads)
    theirs = _run_torch(make_optimizer, params, grads)
    _assert_trees_close(ours, theirs)
    assert all(p.dtype == torch.float32 for p in ours.values())


def test_schedules_match_torch_lambda_lr():
    def schedule(step: int) -> float:
        return 0.1 / (1 + step)

    params, grads = _params(), _grads()
    for transform, make_optimizer in [
        (optim.sgd(schedule, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
        (optim.adam(schedule), lambda p: torch.optim.Adam(p, lr=0.1)),
    ]:
        ours, _ = _run_funcdp(transform, params, grads)
        theirs = _run_torch(
            make_optimizer,
            params,
            grads,
            lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)),
        )
        _assert_trees_close(ours, theirs)


def test_schedule_is_read_at_the_step_count():
    seen = []

    def schedule(step: int) -> float:
        seen.append(step)
        return float(step)

    transform = optim.sgd(schedule)
    state = transform.init({"w": torch.zeros(2)})
    grads = {"w": torch.ones(2)}
    for step in range(3):
        updates, state = transform.update(grads, state)
        assert torch.equal(updates["w"], torch.full((2,), -float(step)))
    assert seen == [0, 1, 2] and state.count == 3


def test_apply_updates():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0], dtype=torch.float64)}
    updates = {"a": torch.tensor([0.5, -1.0], dtype=torch.float64), "b": torch.tensor([-3.0])}
    new = optim.apply_updates(params, updates)
    assert torch.equal(new["a"], torch.tensor([1.5, 1.0]))
    assert torch.equal(new["b"], torch.tensor([0.0], dtype=torch.float64))
    assert new["a"].dtype == torch.float32 and new["b"].dtype == torch.float64
    assert torch.equal(params["a"], torch.tensor([1.0, 2.0]))  # not in place


def test_optimizers_do_not_mutate_their_inputs():
    params, grads = _params(), _grads(2)
    for transform in (optim.sgd(0.1, momentum=0.9), optim.adamw(1e-2)):
        state = transform.init(params)
        _, state = transform.update(grads[0], state, params)
        before = tree_clone((params, grads[1], state))
        out1 = transform.update(grads[1], state, params)
        out2 = transform.update(grads[1], state, params)
        for x, y in zip(tree_leaves(before), tree_leaves((params, grads[1], state)), strict=True):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(tree_leaves(out1), tree_leaves(out2), strict=True):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_adamw_needs_params():
    transform = optim.adamw(1e-2)
    state = transform.init({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="params"):
        transform.update({"w": torch.ones(2)}, state)


# ---------------------------------------------------------------- from_torch


@pytest.mark.parametrize(
    "optimizer_class,hyperparameters",
    [
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ],
)
def test_from_torch_matches_the_optimizer_run_directly(optimizer_class, hyperparameters):
    params, grads = _params(), _grads()
    ours, _ = _run_funcdp(optim.from_torch(optimizer_class, **hyperparameters), params, grads)
    theirs = _run_torch(lambda p: optimizer_class(p, **hyperparameters), params, grads)
    for name in ours:
        # The adapter adds (p_new - p) back to p: a rounding of one ulp or so per step.
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-12, rtol=0)


def test_from_torch_is_pure():
    params, grads = _params(), _grads(3)
    transform = optim.from_torch(torch.optim.Adam, lr=1e-2)
    state = transform.init(params)
    for g in grads[:2]:
        updates, state = transform.update(g, state, params)
        params = optim.apply_updates(params, updates)
    before = tree_clone((params, grads[2], state))
    out1 = transform.update(grads[2], state, params)
    out2 = transform.update(grads[2], state, params)
    leaves_before = tree_leaves(before)
    leaves_after = tree_leaves((params, grads[2], state))
    assert len(leaves_before) == len(leaves_after)
    for x, y in zip(leaves_before, leaves_after, strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    for x, y in zip(tree_leaves(out1), tree_leaves(out2), strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert params["layer.weight"].grad is None and not params["layer.weight"].requires_grad


def test_from_torch_needs_params():
    transform = optim.from_torch(torch.optim.SGD, lr=0.1)
    params = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="params"):
        transform.update({"w": torch.ones(2)}, transform.init(params))


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("lr", [-0.1, math.nan, math.inf, "0.1", True, False])
def test_bad_learning_rate_raises(lr):
    for make in (optim.sgd, optim.momentum, optim.adam, optim.adamw):
        with pytest.raises(ValueError, match="learning_rate"):
            make(lr)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: optim.sgd(0.1, momentum=1.0), "momentum"),
        (lambda: optim.sgd(0.1, momentum=-0.1), "momentum"),
        (lambda: optim.momentum(0.1, beta=1.5), "momentum"),
        (lambda: optim.adam(0.1, b1=1.0), "b1"),
        (lambda: optim.adam(0.1, b2=-0.5), "b2"),
        (lambda: optim.adamw(0.1, weight_decay=-1e-2), "weight_decay"),
    ],
)
def test_bad_hyperparameters_raise(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: optim.sgd(0.1, momentum=True), r"momentum must be in \[0, 1\), got True"),
        (lambda: optim.sgd(0.1, momentum=False), r"momentum must be in \[0, 1\), got False"),
        (lambda: optim.sgd(0.1, momentum=math.nan), r"momentum must be in \[0, 1\), got nan"),
        (lambda: optim.momentum(0.1, beta=math.nan), r"momentum must be in \[0, 1\), got nan"),
        (lambda: optim.momentum(0.1, beta=False), r"momentum must be in \[0, 1\), got False"),
        (lambda: optim.adam(0.1, b1=math.nan), r"b1 must be in \[0, 1\), got nan"),
        (lambda: optim.adam(0.1, b1=False), r"b1 must be in \[0, 1\), got False"),
        (lambda: optim.adamw(0.1, b2=math.nan), r"b2 must be in \[0, 1\), got nan"),
        (lambda: optim.adamw(0.1, b2=True), r"b2 must be in \[0, 1\), got True"),
        (lambda: optim.adam(0.1, eps=-1), "eps must be a finite number > 0, got -1"),
        (lambda: optim.adam(0.1, eps=0.0), "eps must be a finite number > 0, got 0.0"),
        (lambda: optim.adam(0.1, eps=math.nan), "eps must be a finite number > 0, got nan"),
        (lambda: optim.adamw(0.1, eps=math.inf), "eps must be a finite number > 0, got inf"),
        (lambda: optim.adamw(0.1, eps=True), "eps must be a finite number > 0, got True"),
        (
            lambda: optim.adamw(0.1, weight_decay=math.nan),
            "weight_decay must be a finite number >= 0, got nan",
        ),
        (
            lambda: optim.adamw(0.1, weight_decay=math.inf),
            "weight_decay must be a finite number >= 0, got inf",
        ),
        (
            lambda: optim.adamw(0.1, weight_decay=True),
            "weight_decay must be a finite number >= 0, got True",
        ),
    ],
)
def test_nan_bool_and_nonpositive_hyperparameters_raise_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1, "0.1", None, True, torch.tensor(-1.0)])
@pytest.mark.parametrize("make", [optim.sgd, optim.momentum, optim.adam, optim.adamw])
def test_bad_schedule_value_raises_at_its_step_and_leaves_the_state(make, value):
    def schedule(step: int):
        return 0.1 if step < 2 else value

    transform = make(schedule)
    params, grads = _params(), _grads(3)
    state = transform.init(params)
    for g in grads[:2]:
        _, state = transform.update(g, state, params)
    before = tree_clone((params, grads[2], state))
    message = r"learning_rate schedule must return a finite number >= 0, got .* at step 2$"
    with pytest.raises(ValueError, match=message):
        transform.update(grads[2], state, params)
    for x, y in zip(tree_leaves(before), tree_leaves((params, grads[2], state)), strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


@pytest.mark.parametrize("value", [0, 0.05, np.float32(0.05), torch.tensor(0.05)])
def test_schedule_may_return_any_finite_non_negative_real(value):
    transform = optim.sgd(lambda step: value)
    updates, state = transform.update({"w": torch.ones(2)}, transform.init({"w": torch.zeros(2)}))
    torch.testing.assert_close(updates["w"], torch.full((2,), -float(value)))
    assert state.count == 1

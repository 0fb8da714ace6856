"""Tests for funcdp/transforms/adaptive_clipping.py: quantile tracking with a private count."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcdp as fdp
from funcdp import transforms as T
from funcdp.testing import check_pure, check_sensitivity
from funcdp.transforms.adaptive_clipping import AdaptiveClipState

BATCH = 256


def _adaptive(initial=0.5, quantile=0.5, **kwargs):
    kwargs.setdefault("count_noise_multiplier", BATCH / 20)
    kwargs.setdefault("expected_batch_size", BATCH)
    return T.adaptive_clip(initial, quantile, 0.2, **kwargs)


def _with_norms(norms: torch.Tensor, dim: int, gen: torch.Generator) -> torch.Tensor:
    direction = torch.randn((norms.shape[0], dim), generator=gen, dtype=torch.float64)
    return direction / direction.norm(dim=1, keepdim=True) * norms[:, None]


@pytest.mark.parametrize(("quantile", "expected"), [(0.5, 3.0), (0.9, 4.6)])
def test_norm_converges_to_the_target_quantile_with_noise(quantile, expected):
    # Norms uniform on [1, 5]: the gamma-quantile is 1 + 4 gamma.
    transform = T.chain(_adaptive(0.5, quantile), T.aggregate())
    state = transform.init(None)
    gen = torch.Generator().manual_seed(0)
    for step in range(200):
        norms = 1 + 4 * torch.rand(BATCH, generator=gen, dtype=torch.float64)
        grads = {"w": _with_norms(norms, 4, gen)}
        _, state = transform.update(grads, state, key=fdp.random.key(step))
    tracked = float(state[0].norms[0])
    assert abs(tracked - expected) <= 0.1 * expected, tracked


def test_per_layer_norms_track_each_groups_quantile():
    transform = T.chain(_adaptive({"a": 0.5, "b": 0.5}), T.aggregate())
    state = transform.init(None)
    gen = torch.Generator().manual_seed(1)
    for step in range(200):
        a = 1 + 4 * torch.rand(BATCH, generator=gen, dtype=torch.float64)  # median 3
        b = 0.1 + 0.4 * torch.rand(BATCH, generator=gen, dtype=torch.float64)  # median 0.3
        grads = {"a": _with_norms(a, 3, gen), "b": _with_norms(b, 2, gen)}
        _, state = transform.update(grads, state, key=fdp.random.key(step))
    tracked = state[0].norms.tolist()
    assert abs(tracked[0] - 3.0) <= 0.3 and abs(tracked[1] - 0.3) <= 0.03, tracked


def test_update_scales_to_initial_norm_and_counts_real_unclipped_examples():
    transform = _adaptive(1.0)
    state = transform.init(None)._replace(norms=torch.tensor([2.0], dtype=torch.float64))
    gen = torch.Generator().manual_seed(2)
    norms = torch.tensor([0.5, 1.5, 3.0, 0.1], dtype=torch.float64)
    grads = {"w": _with_norms(norms, 5, gen)}
    mask = torch.tensor([True, True, True, False])
    out, new = transform.update(grads, state, key=fdp.random.key(0), mask=mask)
    after = out["w"].norm(dim=1)
    # factor C_0 / max(n, C_t) = 1 / max(n, 2)
    torch.testing.assert_close(after, norms / torch.clamp(norms, min=2.0))
    # real rows: 0.5 and 1.5 unclipped, 3.0 clipped: (1 + 1 + 0) - 3 / 2
    assert new.pending.tolist() == [0.5]
    assert torch.equal(new.norms, state.norms)  # the norm moves only in finish


def test_at_the_initial_norm_it_is_flat_clipping():
    gen = torch.Generator().manual_seed(3)
    grads = {"w": _with_norms(torch.linspace(0.1, 3, 9, dtype=torch.float64), 4, gen)}
    ours, _ = _adaptive(1.0).update(grads, _adaptive(1.0).init(None))
    reference, _ = fdp.clip(1.0).update(grads, ())
    torch.testing.assert_close(ours["w"], reference["w"], rtol=1e-12, atol=0)


def test_finish_moves_the_norm_geometrically_with_count_noise_of_std_sigma_b():
    sigma_b, eta, gamma = 7.0, 0.2, 0.5
    transform = T.adaptive_clip(
        1.0, gamma, eta, count_noise_multiplier=sigma_b, expected_batch_size=BATCH
    )
    state = transform.init(None)
    noises = []
    for seed in range(2000):
        new = transform.finish(state, key=fdp.random.key(seed))
        # log C' = -eta * ((0 + noise) / B + 1/2 - gamma)
        noises.append(-math.log(float(new.norms[0])) / eta * BATCH)
        assert float(new.pending[0]) == 0.0
    result = scipy.stats.kstest(noises, "norm", args=(0.0, sigma_b))
    assert result.pvalue > 0.01, result
    with pytest.raises(ValueError, match="needs a key"):
        transform.finish(state)


def test_privacy_accounting_and_raised_gradient_noise():
    sigma, sigma_b, q = 1.5, 5.0, 0.01
    chain = T.chain(
        _adaptive(2.0, count_noise_multiplier=sigma_b, expected_batch_size=100),
        T.aggregate(),
        T.gaussian_noise(sigma),
        T.normalize(100),
        T.account(q),
    )
    state = chain.init(None)
    zeros = {"w": torch.zeros((3, 40_000), dtype=torch.float64)}
    outs = []
    for step in range(10):
        out, state = chain.update(zeros, state, key=fdp.random.key(step))
        outs.append(out["w"])
    ledger = state[-1].ledger
    assert ledger.records == (fdp.LedgerRecord(sigma, q, 10),)
    assert fdp.epsilon(ledger, delta=1e-5) == fdp.dpsgd_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=10, delta=1e-5
    )
    raised = (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert T.gradient_noise_multiplier(sigma, sigma_b) == pytest.approx(raised, rel=1e-12)
    measured = float(torch.stack(outs).std())
    # std = sigma_grad * C_0 / B: the noise uses the fixed sensitivity C_0 = 2
    assert measured == pytest.approx(raised * 2.0 / 100, rel=0.01)
    assert raised > sigma * 1.005  # the raise is visible at this tolerance


@settings(max_examples=200)
@given(
    sigma=st.floats(0.01, 50), ratio=st.floats(0.5001, 1000)
)  # sigma_b = ratio * sigma > sigma / 2
def test_gradient_multiplier_composes_to_sigma(sigma, ratio):
    sigma_b = ratio * sigma
    grad = T.gradient_noise_multiplier(sigma, sigma_b)
    assert grad >= sigma
    assert grad**-2 + (2 * sigma_b) ** -2 == pytest.approx(sigma**-2, rel=1e-9)


@pytest.mark.parametrize("sigma", [2.0, 3.0])
def test_refuses_sigma_at_or_above_twice_sigma_b(sigma):
    with pytest.raises(
        ValueError, match=r"noise_multiplier must be < 2 \* count_noise_multiplier = 2"
    ):
        T.chain(_adaptive(count_noise_multiplier=1.0), T.aggregate(), T.gaussian_noise(sigma))


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="target_quantile must be in \\[0, 1\\], got 1.5"):
        T.adaptive_clip(1.0, 1.5, count_noise_multiplier=1.0, expected_batch_size=10)
    for quantile in (True, False, math.nan):
        with pytest.raises(
            ValueError, match=f"target_quantile must be in \\[0, 1\\], got {quantile}"
        ):
            T.adaptive_clip(1.0, quantile, count_noise_multiplier=1.0, expected_batch_size=10)
    with pytest.raises(ValueError, match="count_noise_multiplier must be a finite number > 0"):
        T.adaptive_clip(1.0, count_noise_multiplier=0.0, expected_batch_size=10)
    with pytest.raises(ValueError, match="initial_norm must be a finite number > 0, got -1"):
        T.adaptive_clip(-1, count_noise_multiplier=1.0, expected_batch_size=10)
    with pytest.raises(ValueError, match="with groups needs initial_norm as a mapping"):
        _adaptive(1.0, groups=lambda p: p)
    with pytest.raises(ValueError, match="only one adaptive clipping"):
        T.chain(_adaptive(), _adaptive(), T.aggregate())


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("per_layer", [False, True], ids=["flat", "per_layer"])
def test_microbatched_and_whole_batch_steps_agree(per_layer):
    torch.manual_seed(0)
    apply_fn, params, buffers = fdp.functionalize(_Net().double())

    def loss_fn(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x[None]), y[None])

    initial = {name: 0.3 for name in params} if per_layer else 0.3
    privatizer = T.chain(
        T.adaptive_clip(initial, 0.5, 0.2, count_noise_multiplier=2.0, expected_batch_size=10),
        T.aggregate(),
        T.gaussian_noise(1.0),
        T.normalize(10),
        T.account(0.1),
    )
    optimizer = fdp.optim.sgd(0.5)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(13, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=gen)
    mask = torch.rand(13, generator=gen) < 0.8
    states = []
    for micro in (None, 4):
        step = fdp.make_train_step(
            loss_fn, privatizer, optimizer, performance=fdp.Performance(microbatch_size=micro)
        )
        state = fdp.TrainState.create(
            params,
            buffers=buffers,
            privatizer=privatizer,
            optimizer=optimizer,
            key=fdp.random.key(7),
        )
        for _ in range(5):
            state, _ = step(state, fdp.Batch((x, y), mask))
        states.append(state)
    whole, micro = states
    for name in params:
        torch.testing.assert_close(whole.params[name], micro.params[name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(whole.privacy_state[0].norms, micro.privacy_state[0].norms)
    assert not torch.equal(whole.privacy_state[0].norms, torch.as_tensor(0.3, dtype=torch.float64))
    assert whole.privacy_state[0].pending.abs().max() == 0  # closed once per logical batch


# ---- the kit -----------------------------------------------------------------------------------

KIT_PARAMS = {
    "fc1.weight": torch.zeros(2, 2),
    "fc1.bias": torch.zeros(2),
    "fc2.weight": torch.zeros(3),
}
KIT_TRANSFORMS = {
    "flat": (_adaptive(1.0, count_noise_multiplier=1.0, expected_batch_size=4), None),
    "per_layer": (
        _adaptive({"fc1": 0.5, "fc2": 2.0}, groups=lambda p: p.split(".")[0]),
        KIT_PARAMS,
    ),
}


@pytest.mark.parametrize("name", sorted(KIT_TRANSFORMS))
def test_adaptive_clip_passes_the_kit(name):
    transform, params = KIT_TRANSFORMS[name]
    check_sensitivity(transform, params=params, max_examples=200)
    check_pure(transform, params=params, max_examples=200)


@pytest.mark.parametrize("factor", [0.01, 30.0])
def test_adaptive_clip_keeps_its_sensitivity_after_the_norm_moved(factor):
    transform, _ = KIT_TRANSFORMS["flat"]
    state = transform.init(None)
    moved = AdaptiveClipState(state.norms * factor, state.pending)
    check_sensitivity(transform, state=moved, max_examples=100)


def test_split_chain_leaves_closing_the_batch_to_finish():
    privatizer = T.chain(_adaptive(1.0), T.aggregate(), T.gaussian_noise(1.0))
    split = T.base.split_at_reduce(privatizer)
    first, index = split.through_sum, split.index
    assert index == 2 and first.finish is not None
    assert T.base.split_at_reduce(T.chain(fdp.clip(1.0), T.aggregate()))[0].finish is None
    grads = {"w": torch.full((4, 2), 0.1, dtype=torch.float64)}
    state = privatizer.init(None)[:index]
    key = fdp.random.key(3)
    _, half = first.update(grads, state, key=key)
    assert half[0].pending.tolist() == [2.0]  # accumulated, not closed
    assert torch.equal(half[0].norms, state[0].norms)
    closed = first.finish(half, key=key)
    # the same as one whole-chain update, which closes the batch itself
    _, whole = privatizer.update(grads, privatizer.init(None), key=key)
    assert torch.equal(closed[0].norms, whole[0].norms) and closed[0].pending.tolist() == [0.0]


def test_a_nonfinite_example_left_out_by_the_step_is_left_out_of_the_count():
    """on_nonfinite="zero" treats a non-finite example as padding: the gradient, the count and
    the tracked norm are those of the batch without it."""
    model = nn.Linear(2, 1).double()
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x):
        return apply_fn(params, buffers, x[None]).sum()

    privatizer = T.chain(_adaptive(0.5), T.aggregate(), T.gaussian_noise(1.0))
    optimizer = fdp.optim.sgd(1.0)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, on_nonfinite="zero")
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(2)
    )
    x = torch.tensor(
        [[1.0, 2.0], [float("nan"), 0.0], [0.1, 0.1], [3.0, -1.0]], dtype=torch.float64
    )
    mask = torch.tensor([True, True, True, False])
    new, metrics = step(state, fdp.Batch((x,), mask))
    without = torch.tensor([True, False, True, False])
    reference, _ = step(state, fdp.Batch((torch.nan_to_num(x),), without))
    assert metrics["nonfinite"] == 1
    assert torch.equal(new.privacy_state[0].norms, reference.privacy_state[0].norms)
    for name, value in new.params.items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, reference.params[name])

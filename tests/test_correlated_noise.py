"""correlated_noise: its covariance across steps, resumption, the train step's modes, refusals."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcdp as fdp
from funcdp import mf, optim
from funcdp.data import Batch
from funcdp.transforms import CorrelatedNoiseState, correlated_noise

SIGMA, CLIP, SCALE = 0.7, 2.0, 0.5


def _released_noise(strategy, noise_matrix_scale: float = 1.0, coordinates: int = 100_000):
    """Noise of every step on zero gradients, [steps, coordinates]: each coordinate is an
    independent draw of the whole process."""
    privatizer = fdp.chain(
        fdp.clip(CLIP), fdp.aggregate(), fdp.normalize(1 / SCALE), correlated_noise(SIGMA, strategy)
    )
    params = {"w": torch.zeros(coordinates, dtype=torch.float64)}
    state = privatizer.init(params)
    zeros = {"w": torch.zeros(2, coordinates, dtype=torch.float64)}
    mask = torch.tensor([True, False])
    rows = []
    for t in range(strategy.steps):
        key = fdp.random.fold_in(fdp.random.key(5), t)
        noisy, state = privatizer.update(zeros, state, params, key=key, mask=mask)
        rows.append(noisy["w"])
    return torch.stack(rows) * noise_matrix_scale


def _covariance_z_scores(samples: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|empirical - expected| / standard error for every entry of the covariance, using
    Var(x_s x_t) = S_ss S_tt + S_st^2 for zero-mean Gaussians."""
    count = samples.shape[1]
    empirical = samples @ samples.T / count
    diagonal = expected.diagonal()
    stderr = ((diagonal[:, None] * diagonal[None, :] + expected.square()) / count).sqrt()
    return (empirical - expected).abs() / stderr


@pytest.mark.parametrize(
    "strategy",
    [mf.banded(6, 3, min_separation=3), mf.blt(6, 2), mf.tree(6)],
    ids=["banded", "blt", "tree"],
)
def test_covariance_across_steps_matches_the_strategy(strategy):
    samples = _released_noise(strategy)
    m = strategy.noise_matrix()
    expected = (SIGMA * CLIP * SCALE) ** 2 * (m @ m.T)
    assert _covariance_z_scores(samples, expected).max() < 5.0
    # A strategy 5% off (noise matrix scaled by 1.05) is rejected by the same test.
    assert _covariance_z_scores(samples, 1.05**2 * expected).max() > 5.0


def test_covariance_test_rejects_a_different_strategy():
    samples = _released_noise(mf.banded(6, 3, min_separation=3))
    other = mf.BandedStrategy(6, 3, 2, (1.0, 0.6, 0.45))
    m = other.noise_matrix()
    expected = (SIGMA * CLIP * SCALE) ** 2 * (m @ m.T)
    assert _covariance_z_scores(samples, expected).max() > 5.0


def _setup(strategy, performance=fdp.Performance(), min_separation=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    privatizer = fdp.chain(
        fdp.clip(1.0),
        fdp.aggregate(),
        correlated_noise(1.0, strategy),
        fdp.normalize(4.0),
        fdp.account(0.25, min_separation=min_separation or strategy.min_separation),
    )
    optimizer = optim.sgd(0.2, momentum=0.9)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, performance=performance)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(1)
    )
    return state, step


def _batch(seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=generator)
    y = torch.randint(0, 2, (8,), generator=generator)
    return Batch((x, y), torch.arange(8) < 6)


def _load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # funcdp registers its state types


@pytest.mark.parametrize(
    "performance",
    [
        fdp.Performance(mode="vmap"),
        fdp.Performance(mode="ghost"),
        fdp.Performance(mode="vmap", microbatch_size=3),
    ],
    ids=["vmap", "ghost", "microbatches"],
)
@pytest.mark.parametrize(
    "build", [lambda: mf.banded(8, 2), lambda: mf.blt(8, 2)], ids=["bandmf", "blt"]
)
def test_resume_is_bit_identical(performance, build):
    strategy = build()
    state0, step = _setup(strategy, performance)
    uninterrupted = state0
    for t in range(5):
        uninterrupted, _ = step(uninterrupted, _batch(t))
    state = state0
    for t in range(2):
        state, _ = step(state, _batch(t))
    state = _load(state)
    _, fresh_step = _setup(strategy, performance)
    for t in range(2, 5):
        state, _ = fresh_step(state, _batch(t))
    for name, value in uninterrupted.params.items():
        torch.testing.assert_close(state.params[name], value, rtol=0, atol=0)
    assert state.ledger == uninterrupted.ledger and state.ledger.steps == 5
    (noise_state,) = [s for s in state.privacy_state if isinstance(s, CorrelatedNoiseState)]
    assert noise_state.index == 5


def test_ghost_and_vmap_modes_add_the_same_noise():
    strategy = mf.banded(8, 2)
    results = []
    for mode in ("vmap", "ghost"):
        state, step = _setup(strategy, fdp.Performance(mode=mode))
        for t in range(3):
            state, _ = step(state, _batch(t))
        results.append(state.params)
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6)


def test_noise_is_the_same_for_the_same_key_and_new_for_a_new_one():
    strategy = mf.blt(4, 2)
    params = {"w": torch.zeros(50)}
    transform = fdp.chain(fdp.clip(1.0), fdp.aggregate(), correlated_noise(1.0, strategy))
    state = transform.init(params)
    grads, mask = {"w": torch.zeros(1, 50)}, torch.tensor([True])
    a, _ = transform.update(grads, state, params, key=fdp.random.key(0), mask=mask)
    b, _ = transform.update(grads, state, params, key=fdp.random.key(0), mask=mask)
    c, _ = transform.update(grads, state, params, key=fdp.random.key(1), mask=mask)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])


def test_a_step_past_the_strategy_is_refused():
    strategy = mf.banded(3, 1, min_separation=1)
    state, step = _setup(strategy)
    for t in range(3):
        state, _ = step(state, _batch(t))
    with pytest.raises(ValueError, match="built for 3 steps; step 4 is refused"):
        step(state, _batch(3))
    assert state.step == 3


def test_refused_without_a_clip_upstream():
    with pytest.raises(ValueError, match="correlated_noise needs a transform with bounded"):
        fdp.chain(fdp.aggregate(), correlated_noise(1.0, mf.tree(4)))


def test_refused_beside_a_privatized_count():
    with pytest.raises(ValueError, match="privatized count"):
        fdp.chain(
            fdp.adaptive_clip(1.0, count_noise_multiplier=5.0, expected_batch_size=4.0),
            fdp.aggregate(),
            correlated_noise(1.0, mf.tree(4)),
        )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        correlated_noise(-1.0, mf.tree(4))
    with pytest.raises(TypeError, match="strategy must be a funcdp.mf strategy"):
        correlated_noise(1.0, "bandmf")
    with pytest.raises(ValueError, match="use it inside"):
        correlated_noise(1.0, mf.tree(4)).update({}, None)


def test_noise_std_per_step_matches_the_noise_matrix_diagonal():
    # Identity with 4 participations, b = 1: the noise is sqrt(4) = 2 times DP-SGD's.
    strategy = mf.banded(4, 1, min_separation=1)
    samples = _released_noise(strategy, coordinates=40_000)
    expected_std = SIGMA * CLIP * SCALE * math.sqrt(4)
    assert samples.std(1).div(expected_std).sub(1).abs().max() < 0.03


@pytest.mark.parametrize(
    "clip, sensitivity",
    [
        (fdp.clip(1.5), 1.5),
        (fdp.clip_per_layer({"a": 0.3, "b": 0.4}), 0.5),
        (fdp.normalize_per_example(2.0, 0.01), 2.0),
    ],
    ids=["flat", "per_layer", "automatic"],
)
def test_noise_reads_the_sensitivity_of_every_clipping_scheme(clip, sensitivity):
    strategy = mf.banded(3, 1, min_separation=3)  # one participation: M = I
    privatizer = fdp.chain(clip, fdp.aggregate(), correlated_noise(0.8, strategy))
    params = {"a": torch.zeros(30_000), "b": torch.zeros(30_000)}
    state = privatizer.init(params)
    grads = {name: torch.zeros(1, 30_000) for name in params}
    noisy, _ = privatizer.update(
        grads, state, params, key=fdp.random.key(0), mask=torch.ones(1, dtype=bool)
    )
    std = torch.cat([noisy["a"], noisy["b"]]).std().item()
    assert std == pytest.approx(0.8 * sensitivity, rel=0.02)  # standard error of the std: 0.3%

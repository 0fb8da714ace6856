"""Tests for funcdp/audit: canaries, white-box, many-run and black-box audits, command, notebook 03.

The audits run the real privatizer chain, Poisson sampler and accountant. The correct engine
must never be caught (lower bound <= the accountant's epsilon); three sabotaged engines must be.
"""

import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcdp as fdp
from funcdp import audit, datasets
from funcdp.audit import black_box, canaries, command
from funcdp.transforms import PER_EXAMPLE, GradientTransformation

DELTA = 1e-5
M = 1000
PARAMS = {"w": torch.zeros(M)}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def dpsgd(noise_multiplier, *, sample_rate=1.0, max_norm=1.0, clipper=None):
    clipper = fdp.clip(max_norm) if clipper is None else clipper
    return fdp.chain(
        clipper,
        fdp.aggregate(),
        fdp.gaussian_noise(noise_multiplier),
        fdp.normalize(sample_rate * M / 2),
        fdp.account(sample_rate),
    )


def audit_and_epsilon(privatizer, *, sample_rate, steps, seed, canary_norm=None):
    """The audit's lower bound and the accountant's epsilon for the same run."""
    kwargs = dict(
        sample_rate=sample_rate, steps=steps, key=fdp.random.key(seed), canary_norm=canary_norm
    )
    result = audit.audit_privatizer(privatizer, PARAMS, delta=DELTA, num_canaries=M, **kwargs)
    run = audit.run_dirac_canaries(privatizer, PARAMS, num_canaries=M, **kwargs)
    assert torch.equal(run.scores, result.scores) and torch.equal(run.included, result.included)
    return result, fdp.epsilon(run.ledger, delta=DELTA)


# ---- canaries ----------------------------------------------------------------------------


@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    norm=st.floats(0.1, 10.0),
    data=st.data(),
)
@settings(derandomize=True, max_examples=30, deadline=None)
def test_dirac_canaries_have_one_coordinate_of_the_given_norm(shapes, norm, data):
    params = {f"p{i}": torch.zeros(shape) for i, shape in enumerate(shapes)}
    size = canaries.num_coordinates(params)
    coordinates = torch.tensor(
        data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=6))
    )
    grads = audit.dirac_canary_grads(params, coordinates, norm)
    flat = torch.cat(
        [leaf.reshape(len(coordinates), -1) for leaf in fdp.tree.tree_leaves(grads)], 1
    )
    expected = torch.zeros(len(coordinates), size)
    expected[torch.arange(len(coordinates)), coordinates] = norm
    torch.testing.assert_close(flat, expected, rtol=0, atol=0)
    # The same order as `flatten`, which reads the scores.
    torch.testing.assert_close(
        canaries.flatten(fdp.tree.tree_map(lambda g: g[0], grads)), expected[0].double()
    )


def test_canary_parameter_round_trip():
    params = {"a": torch.ones(2, 3)}
    padded = audit.with_canary_parameter(params, 7)
    assert padded[audit.CANARY_PARAMETER].shape == (7,) and not padded[audit.CANARY_PARAMETER].any()
    assert audit.without_canary_parameter(padded).keys() == params.keys()
    with pytest.raises(ValueError, match="already has"):
        audit.with_canary_parameter(padded, 7)
    with pytest.raises(ValueError, match="num_canaries must be"):
        audit.with_canary_parameter(params, 0)


def test_canaries_go_through_the_real_sampler_clip_and_normalization():
    # Without noise the scores expose the mechanism: an included canary scores
    # (times sampled) * C / B_expected, an excluded one exactly 0.
    steps, rate = 20, 0.3
    run = audit.run_dirac_canaries(
        dpsgd(0.0, sample_rate=rate), PARAMS, sample_rate=rate, steps=steps, key=fdp.random.key(3)
    )
    times = run.scores * (rate * M / 2)
    assert torch.equal(
        run.scores[~run.included], torch.zeros(int((~run.included).sum()), dtype=torch.float64)
    )
    counts = times[run.included]
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-3)
    # Poisson sampling: each included canary is in Binomial(20, 0.3) batches.
    assert abs(float(counts.mean()) - steps * rate) < 0.3
    assert abs(float(counts.var()) - steps * rate * (1 - rate)) < 0.6
    assert 0.4 < float(run.included.double().mean()) < 0.6
    assert run.ledger.steps == steps


def test_full_batch_canaries_are_in_every_step_and_clipped():
    # A canary of norm 5C is clipped to C by the real clip transform.
    run = audit.run_dirac_canaries(
        dpsgd(0.0), PARAMS, sample_rate=1.0, steps=3, key=fdp.random.key(0), canary_norm=5.0
    )
    expected = torch.where(run.included, 3 * 1.0 / (M / 2), 0.0).double()
    torch.testing.assert_close(run.scores, expected)


def test_runs_are_reproducible_from_the_key():
    privatizer = dpsgd(1.0)
    first = audit.audit_privatizer(
        privatizer, PARAMS, sample_rate=1.0, steps=1, key=fdp.random.key(5), delta=DELTA
    )
    again = audit.audit_privatizer(
        privatizer, PARAMS, sample_rate=1.0, steps=1, key=fdp.random.key(5), delta=DELTA
    )
    other = audit.audit_privatizer(
        privatizer, PARAMS, sample_rate=1.0, steps=1, key=fdp.random.key(6), delta=DELTA
    )
    assert first[:4] == again[:4]
    assert torch.equal(first.scores, again.scores) and torch.equal(first.included, again.included)
    assert not torch.equal(first.included, other.included)
    assert not torch.equal(first.scores, other.scores)


def test_ledger_is_the_chains_own():
    sigma = 1.3
    run = audit.run_dirac_canaries(
        dpsgd(sigma, sample_rate=0.5), PARAMS, sample_rate=0.5, steps=4, key=fdp.random.key(0)
    )
    assert run.ledger == fdp.Ledger().record(sigma, 0.5, 4)
    assert fdp.epsilon(run.ledger, delta=DELTA) == fdp.dpsgd_epsilon(
        noise_multiplier=sigma, sample_rate=0.5, steps=4, delta=DELTA
    )


def test_audit_refuses_bad_arguments():
    privatizer = dpsgd(1.0)
    kwargs = dict(sample_rate=1.0, steps=1, key=fdp.random.key(0), delta=DELTA)
    with pytest.raises(ValueError, match="num_canaries must be at most the 1000 coordinates"):
        audit.audit_privatizer(privatizer, PARAMS, num_canaries=1001, **kwargs)
    with pytest.raises(ValueError, match="stage 'reduce'"):
        audit.audit_privatizer(fdp.chain(fdp.clip(1.0)), PARAMS, **kwargs)
    no_sensitivity = fdp.chain(
        GradientTransformation(lambda p: (), lambda u, s, p=None, **k: (u, s), PER_EXAMPLE),
        fdp.aggregate(),
    )
    with pytest.raises(ValueError, match="pass canary_norm"):
        audit.audit_privatizer(no_sensitivity, PARAMS, **kwargs)
    with pytest.raises(ValueError, match="canary_norm must be"):
        audit.audit_privatizer(privatizer, PARAMS, canary_norm=-1.0, **kwargs)
    with pytest.raises(ValueError, match="sample_rate must be in"):
        audit.audit_privatizer(privatizer, PARAMS, **{**kwargs, "sample_rate": 1.5})
    with pytest.raises(ValueError, match="steps must be"):
        audit.audit_privatizer(privatizer, PARAMS, **{**kwargs, "steps": 0})
    with pytest.raises(ValueError, match="delta must be in"):
        audit.audit_privatizer(privatizer, PARAMS, **{**kwargs, "delta": 1.0})


# ---- the correct engine is never caught; the audit is tight -------------------------------


@pytest.mark.parametrize("target", [1.0, 2.0, 4.0, 8.0])
def test_correct_engine_stays_below_the_accountants_epsilon(target):
    # Full batch, one step (the strongest setting for the auditor), and Poisson sampling at
    # q = 0.5 over 5 steps; sigma calibrated by funcdp.calibrate_noise for each.
    for rate, steps, seeds in ((1.0, 1, range(3)), (0.5, 5, range(1))):
        sigma = fdp.calibrate_noise(
            target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps
        )
        for seed in seeds:
            result, epsilon = audit_and_epsilon(
                dpsgd(sigma, sample_rate=rate), sample_rate=rate, steps=steps, seed=seed
            )
            assert epsilon == pytest.approx(target, rel=1e-3)
            assert 0.0 <= result.epsilon_lower_bound <= epsilon


@pytest.mark.parametrize("target", [2.0, 4.0])
def test_audit_reaches_half_the_one_run_ceiling(target):
    # Full-batch DP-SGD (q = 1, one step) with 1000 Dirac canaries. The ceiling is what the
    # one-run method can certify against this Gaussian mechanism (mu = 1 / sigma) with 1000
    # canaries and the best number of guesses. The ceilings for an exactly eps-DP mechanism and
    # for all-correct guesses are printed beside it.
    sigma = fdp.calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=1.0, steps=1)
    ceiling, _ = audit.one_run_gaussian_ceiling(M, 1.0 / sigma, delta=DELTA)
    pure, _ = audit.one_run_ceiling(M, delta=DELTA, epsilon=target)
    perfect, _ = audit.one_run_ceiling(M, delta=DELTA)
    bounds = []
    for seed in range(4):
        result, epsilon = audit_and_epsilon(dpsgd(sigma), sample_rate=1.0, steps=1, seed=seed)
        bounds.append(result.epsilon_lower_bound)
        assert result.epsilon_lower_bound >= 0.5 * ceiling
        assert result.epsilon_lower_bound <= epsilon
    print(
        f"eps={target}: bounds {np.round(bounds, 3)}, Gaussian ceiling {ceiling:.3f}, "
        f"eps-DP ceiling {pure:.3f}, all-correct ceiling {perfect:.3f}"
    )


@pytest.mark.slow
def test_sweep_correct_engine_over_many_seeds():
    # 20 audits per setting; at 95% confidence at most one in twenty may exceed, none should.
    for target in (1.0, 2.0, 4.0, 8.0):
        for rate, steps in ((1.0, 1), (1.0, 4), (0.5, 5)):
            sigma = fdp.calibrate_noise(
                target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps
            )
            privatizer = dpsgd(sigma, sample_rate=rate)
            found = [
                audit_and_epsilon(privatizer, sample_rate=rate, steps=steps, seed=seed)
                for seed in range(20)
            ]
            exceeded = sum(result.epsilon_lower_bound > epsilon for result, epsilon in found)
            print(target, rate, steps, max(result.epsilon_lower_bound for result, _ in found))
            assert exceeded <= 1


# ---- sabotaged engines are caught ----------------------------------------------------------


CLAIMED = 2.0


def calibrated_sigma():
    return fdp.calibrate_noise(target_epsilon=CLAIMED, delta=DELTA, sample_rate=1.0, steps=1)


def test_noise_removed_is_caught():
    # sigma = 0 in gaussian_noise while the run claims the epsilon sigma was calibrated for.
    privatizer = dpsgd(0.0)
    result, epsilon = audit_and_epsilon(privatizer, sample_rate=1.0, steps=1, seed=0)
    assert epsilon == math.inf  # the accountant, shown the real ledger, also refuses it
    assert result.epsilon_lower_bound > CLAIMED
    assert result.num_correct == result.num_guesses


def test_clipping_removed_is_caught():
    # A per-example transform that declares sensitivity C but does not clip; canaries of 10C.
    def no_clip(max_norm):
        def update(updates, state, params=None, *, key=None, mask=None):
            del params, key, mask
            return updates, state

        return GradientTransformation(lambda params: (), update, PER_EXAMPLE, sensitivity=max_norm)

    privatizer = dpsgd(calibrated_sigma(), clipper=no_clip(1.0))
    result, epsilon = audit_and_epsilon(
        privatizer, sample_rate=1.0, steps=1, seed=0, canary_norm=10.0
    )
    assert epsilon == pytest.approx(CLAIMED, rel=1e-3)
    assert result.epsilon_lower_bound > epsilon
    # The same canaries against the real clip are not caught.
    honest, epsilon = audit_and_epsilon(
        dpsgd(calibrated_sigma()), sample_rate=1.0, steps=1, seed=0, canary_norm=10.0
    )
    assert honest.epsilon_lower_bound <= epsilon


def test_noise_for_a_reduced_sensitivity_is_caught():
    # The real clip at C, declaring C/4: the noise gets std sigma * C / 4 instead of sigma * C.
    wrong = fdp.clip(1.0)._replace(sensitivity=0.25)
    privatizer = dpsgd(calibrated_sigma(), clipper=wrong)
    result, epsilon = audit_and_epsilon(
        privatizer, sample_rate=1.0, steps=1, seed=0, canary_norm=1.0
    )
    assert epsilon == pytest.approx(CLAIMED, rel=1e-3)
    assert result.epsilon_lower_bound > epsilon


# ---- many runs ------------------------------------------------------------------------------


ONE = {"w": torch.zeros(1)}


def many_run(privatizer, *, sample_rate=1.0, steps=1, trials=600, canary_norm=1.0):
    scores_in, scores_out = audit.many_run_scores(
        privatizer,
        ONE,
        sample_rate=sample_rate,
        steps=steps,
        num_trials=trials,
        key=fdp.random.key(0),
        canary_norm=canary_norm,
    )
    return scores_in, scores_out, audit.many_run_audit(scores_in, scores_out, delta=DELTA)


def test_many_run_scores_go_through_the_real_chain():
    # Without noise: the canary adds its norm / B in every step it is sampled, nothing when
    # absent. Its norm sits 2^-10 below C: a norm of exactly C is scaled by the certified
    # clipping margin (its upper bound is rounded up), and the count would not be whole.
    privatizer = fdp.chain(
        fdp.clip(1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(0.0),
        fdp.normalize(2.0),
        fdp.account(0.5),
    )
    norm = 1.0 - 2.0**-10
    scores_in, scores_out, _ = many_run(
        privatizer, sample_rate=0.5, steps=6, trials=200, canary_norm=norm
    )
    assert torch.equal(scores_out, torch.zeros(200, dtype=torch.float64))
    times = scores_in * 2.0 / norm
    torch.testing.assert_close(times, times.round())
    # Binomial(6, 1/2) batches: mean 3, variance 1.5.
    assert abs(float(times.mean()) - 3.0) < 0.3 and abs(float(times.var()) - 1.5) < 0.45


@pytest.mark.parametrize("target", [2.0, 8.0])
def test_many_run_audit_stays_below_the_accountant(target):
    sigma = fdp.calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=1.0, steps=1)
    privatizer = dpsgd(sigma)
    _, _, result = many_run(privatizer)
    assert 0.0 < result.epsilon_lower_bound <= target
    assert 0.0 < result.gdp_epsilon_lower_bound <= target
    assert result.num_trials == 300


def test_many_run_audit_catches_noise_for_a_reduced_sensitivity():
    sigma = fdp.calibrate_noise(target_epsilon=CLAIMED, delta=DELTA, sample_rate=1.0, steps=1)
    _, _, result = many_run(dpsgd(sigma, clipper=fdp.clip(1.0)._replace(sensitivity=0.25)))
    assert result.epsilon_lower_bound > CLAIMED


def test_many_run_audit_refuses_mismatched_scores():
    with pytest.raises(ValueError, match="same length"):
        audit.many_run_audit(np.zeros(5), np.zeros(6), delta=DELTA)


# ---- black-box input canaries -------------------------------------------------------------


def test_mislabelled_canaries_always_carry_a_wrong_label():
    labels = torch.arange(3000) % 10
    inputs = torch.randn(3000, 4)
    same, wrong = black_box.mislabelled_canaries(inputs, labels, 10, key=fdp.random.key(0))
    assert same is inputs
    assert (wrong != labels).all() and wrong.min() >= 0 and wrong.max() <= 9
    # Uniform over the 9 wrong classes: each offset appears about 3000 / 9 times.
    offsets = torch.bincount((wrong - labels) % 10, minlength=10)
    assert offsets[0] == 0 and offsets[1:].min() > 250 and offsets[1:].max() < 420
    with pytest.raises(ValueError, match="num_classes must be"):
        black_box.mislabelled_canaries(inputs, labels, 1, key=fdp.random.key(0))


def test_random_input_canaries_are_reproducible_noise():
    x, y = black_box.random_input_canaries(
        500, (2, 3), 4, key=fdp.random.key(1), low=-1.0, high=2.0
    )
    again, _ = black_box.random_input_canaries(
        500, (2, 3), 4, key=fdp.random.key(1), low=-1.0, high=2.0
    )
    assert x.shape == (500, 2, 3) and x.dtype == torch.float32 and torch.equal(x, again)
    assert x.min() >= -1.0 and x.max() < 2.0 and abs(float(x.mean()) - 0.5) < 0.05
    assert set(y.tolist()) == {0, 1, 2, 3}


def train_with_input_canaries(noise_multiplier, max_norm, *, steps=40, m=100, n=300):
    """Full-batch training on n digits plus the included mislabelled canaries; black-box scores."""
    x_train, y_train, x_test, y_test, classes = datasets.load_digits()
    keys = fdp.random.split(fdp.random.key(0), 4)
    cx, cy = black_box.mislabelled_canaries(x_test[:m], y_test[:m], classes, key=keys[0])
    included = canaries.draw_included(keys[1], m)
    data = (torch.cat([x_train[:n], cx[included]]), torch.cat([y_train[:n], cy[included]]))
    torch.manual_seed(0)
    apply_fn, params, buffers = fdp.functionalize(
        torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    )

    def loss_fn(params, buffers, x, y):
        return torch.nn.functional.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    privatizer = fdp.chain(
        fdp.clip(max_norm),
        fdp.aggregate(),
        fdp.gaussian_noise(noise_multiplier),
        fdp.normalize(n + m / 2),
        fdp.account(1.0),
    )
    optimizer = fdp.optim.adam(0.01)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=keys[2]
    )
    for batch in fdp.PoissonLoader(data, 1.0, key=keys[3], steps=steps):
        state, _ = step(state, batch)
    scores = black_box.loss_scores(loss_fn, state.params, state.buffers, cx, cy)
    manual = torch.stack(
        [-loss_fn(state.params, state.buffers, a, b) for a, b in zip(cx[:3], cy[:3], strict=True)]
    )
    torch.testing.assert_close(scores[:3], manual.double().detach(), rtol=1e-5, atol=1e-6)
    return audit.guess_from_scores(scores.numpy(), included.numpy(), delta=DELTA), state.ledger


def test_black_box_audit_catches_non_private_training_and_passes_dp_training():
    claimed, steps = 1.0, 40
    # No noise and no effective clipping: the model memorizes the mislabelled canaries.
    leaky, _ = train_with_input_canaries(0.0, 100.0, steps=steps)
    assert leaky.epsilon_lower_bound > claimed
    sigma = fdp.calibrate_noise(target_epsilon=claimed, delta=DELTA, sample_rate=1.0, steps=steps)
    private, ledger = train_with_input_canaries(sigma, 1.0, steps=steps)
    assert private.epsilon_lower_bound <= fdp.epsilon(ledger, delta=DELTA)


# ---- the command and the notebook ----------------------------------------------------------


def test_command_prints_epsilon_beside_the_lower_bound(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--epsilon", "4", "--steps", "3", "--num-canaries", "500"])
    assert command.run(args) == 0
    out = capsys.readouterr().out
    epsilon = float(out.split("accountant epsilon (delta=1e-05):")[1].split()[0])
    bound = float(out.split("empirical lower bound (95% conf.):")[1].split()[0])
    assert epsilon == pytest.approx(4.0, rel=1e-3)
    assert 0.0 < bound <= epsilon
    assert "one-run ceiling, 500 canaries, all right" in out
    assert "audit passed" in out

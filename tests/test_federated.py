"""Tests for funcdp/federated/rounds.py and local.py: a DP-FedAvg round over vmapped clients.

A reference Python loop over the clients (local training, clip, sum, divide by the expected
number of clients) pins the vmapped round; chunking never changes the result; a client without
data contributes exactly zero; the ledger counts rounds as dp_accounting does; the noise has
std sigma * C / expected_clients.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import funcdp as fdp
from funcdp import federated as fed
from funcdp.data import Batch, UserLoader
from tests.conftest import assert_trees_close, assert_trees_equal

D, K, CLASSES = 6, 5, 3
CLIP = 0.3
P_MIN = 1e-6


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, CLASSES))
    return fdp.functionalize(model)


def _row_losses(apply_fn):
    def losses(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x), y, reduction="none")

    return losses


def _clients(num: int, seed: int = 1) -> Batch:
    """`num` clients of K rows each, with 1..K real rows; the last two slots are padding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num, K, D, generator=gen)
    y = torch.randint(0, CLASSES, (num, K), generator=gen)
    counts = torch.randint(1, K + 1, (num,), generator=gen)
    rows = torch.arange(K)[None, :] < counts[:, None]
    mask = torch.ones(num, dtype=torch.bool)
    mask[-2:] = False
    return Batch((x, y, rows), mask)


def _setup(*, noise=0.0, expected=10.0, rate=0.1, server=None, clip=None):
    apply_fn, params, buffers = _model()
    local = fed.local_sgd(_row_losses(apply_fn), learning_rate=0.5, local_steps=3)
    privatizer = fdp.chain(
        clip or fdp.clip(CLIP),
        fdp.aggregate(),
        fdp.gaussian_noise(noise),
        fdp.normalize(expected),
        fdp.account(rate),
    )
    server = server or fdp.optim.sgd(1.0)
    state = fdp.TrainState.create(
        params, privatizer=privatizer, optimizer=server, key=fdp.random.key(3)
    )
    return local, privatizer, server, state


def _reference_round(local, params, clients: Batch, *, expected: float, lr: float = 1.0):
    """FedAvg with a Python loop over the clients, clipping each update at CLIP."""
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(len(clients.mask)):
        if not clients.mask[i]:
            continue
        new = local(params, tuple(t[i] for t in clients.inputs))
        delta = {name: new[name] - params[name] for name in params}
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values()))
        factor = min(1.0, CLIP / float(norm))
        for name in params:
            total[name] += factor * delta[name]
    return {name: params[name] + lr * total[name] / expected for name in params}


def test_vmapped_round_equals_a_python_loop_over_clients():
    local, privatizer, server, state = _setup()
    clients = _clients(12)
    new_state, metrics = fed.make_round(local, privatizer, server)(state, clients)
    expected = _reference_round(local, state.params, clients, expected=10.0)
    assert_trees_close(new_state.params, expected, rtol=1e-5, atol=1e-5)
    assert metrics["clients"] == 10
    assert new_state.step == 1
    moved = max(float((new_state.params[n] - state.params[n]).abs().max()) for n in state.params)
    assert moved > 1e-3  # the round did something worth comparing


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_round_equals_unchunked(chunk):
    local, privatizer, server, state = _setup(noise=1.0)
    clients = _clients(12)
    whole, _ = fed.make_round(local, privatizer, server)(state, clients)
    chunked, _ = fed.make_round(local, privatizer, server, chunk_size=chunk)(state, clients)
    assert_trees_close(chunked.params, whole.params, rtol=1e-6, atol=1e-6)


def test_client_without_data_contributes_exactly_zero():
    local, privatizer, server, state = _setup()
    clients = _clients(8)
    x, y, rows = clients.inputs
    empty_rows = rows.clone()
    empty_rows[2] = False  # client 2 is sampled but has no data
    params = state.params
    update = local(params, (x[2], y[2], empty_rows[2]))
    assert_trees_equal(update, params)
    round_fn = fed.make_round(local, privatizer, server)
    with_empty, _ = round_fn(state, Batch((x, y, empty_rows), clients.mask))
    masked = clients.mask.clone()
    masked[2] = False  # the same client not sampled at all
    without, _ = round_fn(state, Batch((x, y, rows), masked))
    assert_trees_equal(with_empty.params, without.params)


def test_masked_client_contributes_exactly_zero_even_with_nonfinite_data():
    local, privatizer, server, state = _setup()
    clients = _clients(8)
    x, y, rows = clients.inputs
    poisoned = x.clone()
    poisoned[-1] = float("nan")  # a padding slot (mask false)
    round_fn = fed.make_round(local, privatizer, server)
    clean, _ = round_fn(state, clients)
    dirty, _ = round_fn(state, Batch((poisoned, y, rows), clients.mask))
    assert_trees_equal(dirty.params, clean.params)


def test_nonfinite_update_of_a_sampled_client_is_refused():
    local, privatizer, server, state = _setup()
    clients = _clients(8)
    x, y, rows = clients.inputs
    poisoned = x.clone()
    poisoned[0, 0, 0] = float("inf")
    before = {n: p.clone() for n, p in state.params.items()}
    with pytest.raises(fdp.NonFiniteError, match="non-finite update"):
        fed.make_round(local, privatizer, server)(state, Batch((poisoned, y, rows), clients.mask))
    assert_trees_equal(state.params, before)


def test_a_round_is_pure():
    local, privatizer, server, state = _setup(noise=1.0)
    before = {n: p.clone() for n, p in state.params.items()}
    round_fn = fed.make_round(local, privatizer, server, chunk_size=4)
    first, _ = round_fn(state, _clients(9))
    second, _ = round_fn(state, _clients(9))
    assert_trees_equal(first.params, second.params)
    assert_trees_equal(first.opt_state, second.opt_state)
    assert_trees_equal(state.params, before)  # the input state is untouched
    other, _ = round_fn(state._replace(key=fdp.random.key(9)), _clients(9))
    assert any(not torch.equal(other.params[n], first.params[n]) for n in before)


@pytest.mark.parametrize("rounds", [1, 7])
def test_epsilon_per_round_equals_dp_accountings(rounds):
    sigma, rate, delta = 1.3, 0.05, 1e-5
    local, privatizer, server, state = _setup(noise=sigma, rate=rate)
    round_fn = fed.make_round(local, privatizer, server)
    clients = _clients(6)
    for _ in range(rounds):
        state, _ = round_fn(state, clients)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), rounds
    )
    for method, accountant in (
        ("rdp", dp_accounting.rdp.RdpAccountant()),
        ("pld", dp_accounting.pld.PLDAccountant()),
    ):
        reference = accountant.compose(event).get_epsilon(delta)
        ours = fdp.accounting.epsilon(state.ledger, delta=delta, method=method)
        assert ours == pytest.approx(reference, rel=1e-9)
    assert state.step == rounds


def _variance_pvalue(values: np.ndarray, std: float) -> float:
    """Two-sided chi-square test that `values` ~ N(0, std^2) have variance std^2."""
    chi2, dof = float(np.sum((values / std) ** 2)), len(values)
    return 2 * min(stats.chi2.cdf(chi2, dof), stats.chi2.sf(chi2, dof))


def test_round_noise_has_std_sigma_c_over_expected_clients():
    sigma, expected = 2.0, 4.0
    local, privatizer, server, state = _setup(noise=sigma, expected=expected)
    clients = _clients(4)
    nobody = Batch(clients.inputs, torch.zeros(4, dtype=torch.bool))  # an empty round
    values = []
    round_fn = fed.make_round(local, privatizer, server)
    for seed in range(40):
        start = state._replace(key=fdp.random.key(seed))
        new, metrics = round_fn(start, nobody)
        values += [(new.params[n] - start.params[n]).reshape(-1) for n in start.params]
    noise = torch.cat(values).double().numpy()
    std = sigma * CLIP / expected
    assert len(noise) > 3000
    assert stats.kstest(noise / std, "norm").pvalue > P_MIN
    assert _variance_pvalue(noise, std) > P_MIN
    # The test has power: a std 10% off (say, C or the divisor slightly wrong) is rejected.
    assert _variance_pvalue(noise, 1.1 * std) < P_MIN
    assert _variance_pvalue(noise, std / 1.1) < P_MIN
    assert metrics["clients"] == 0


def test_fedadam_round_equals_adam_on_the_looped_pseudo_gradient():
    adam = fdp.optim.adam(0.01, eps=1e-3)
    local, privatizer, server, state = _setup(server=adam)
    clients = _clients(9)
    new_state, _ = fed.make_round(local, privatizer, server)(state, clients)
    mean = _reference_round(local, state.params, clients, expected=10.0)
    pseudo = {n: state.params[n] - mean[n] for n in state.params}
    updates, _ = adam.update(pseudo, adam.init(state.params), state.params)
    expected = fdp.optim.apply_updates(state.params, updates)
    assert_trees_close(new_state.params, expected, rtol=1e-5, atol=1e-5)


def test_adaptive_clipping_of_updates_tracks_the_quantile():
    """Andrew et al. 2021 from the clipping kit: a norm far above every update shrinks by about
    exp(-eta / 2) a round (all clients unclipped), the same chunked or not."""
    clip = fdp.adaptive_clip(100.0, 0.5, 0.5, count_noise_multiplier=1.0, expected_batch_size=10.0)
    local, privatizer, server, state = _setup(noise=1.0, clip=clip)
    chunked_fn = fed.make_round(local, privatizer, server, chunk_size=4)
    whole_fn = fed.make_round(local, privatizer, server)
    clients = _clients(12)
    chunked = whole = state
    for _ in range(5):
        chunked, _ = chunked_fn(chunked, clients)
        whole, _ = whole_fn(whole, clients)
    (norms,) = [s for s in chunked.privacy_state if isinstance(s, fdp.AdaptiveClipState)]
    (whole_norms,) = [s for s in whole.privacy_state if isinstance(s, fdp.AdaptiveClipState)]
    # Five rounds at b = 1 + N(0, 0.1^2) each: exp(-1.25) expected, exp(-0.75) about 4.5 sd away.
    assert float(norms.norms[0]) < 100.0 * math.exp(-0.75)
    torch.testing.assert_close(norms.norms, whole_norms.norms)
    assert_trees_close(chunked.params, whole.params, rtol=1e-6, atol=1e-6)


def test_round_with_user_loader_batches():
    apply_fn, params, _ = _model()
    local = fed.local_sgd(_row_losses(apply_fn), learning_rate=0.5, local_steps=2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, D, generator=gen), torch.randint(0, CLASSES, (300,), generator=gen)
    ids = torch.randint(0, 40, (300,), generator=gen)
    loader = UserLoader((x, y), ids, 0.25, key=fdp.random.key(1), max_examples_per_user=K, steps=3)
    privatizer = fdp.chain(
        fdp.clip(CLIP),
        fdp.aggregate(),
        fdp.gaussian_noise(1.0),
        fdp.normalize(loader.expected_batch_size),
        fdp.account(0.25),
    )
    server = fdp.optim.sgd(1.0)
    state = fdp.TrainState.create(
        params, privatizer=privatizer, optimizer=server, key=fdp.random.key(2)
    )
    round_fn = fed.make_round(local, privatizer, server, chunk_size=7)
    for batch in loader:
        state, metrics = round_fn(state, batch)
        assert metrics["clients"] == int(batch.mask.sum())
    assert state.step == 3
    (record,) = state.ledger.records
    assert (record.steps, record.sample_rate, record.noise_multiplier) == (3, 0.25, 1.0)


def test_bad_arguments_are_refused():
    local, privatizer, server, state = _setup()
    with pytest.raises(ValueError, match="chunk_size"):
        fed.make_round(local, privatizer, server, chunk_size=0)
    with pytest.raises(TypeError, match="Batch"):
        fed.make_round(local, privatizer, server)(state, _clients(4).inputs)
    with pytest.raises(ValueError, match="local_steps"):
        fed.local_sgd(lambda *a: 0, learning_rate=0.1, local_steps=0)
    with pytest.raises(ValueError, match="learning_rate"):
        fed.local_sgd(lambda *a: 0, learning_rate=-1.0, local_steps=1)
    with pytest.raises(ValueError, match="aggregate"):
        fed.make_round(local, fdp.chain(fdp.clip(1.0)), server)
    with pytest.raises(ValueError, match="state.step"):
        fed.make_round(local, privatizer, server)(state._replace(step=-1), _clients(4))


def test_dp_fedavg_is_the_clip_noise_normalize_account_chain_and_server_sgd():
    local, privatizer, server, state = _setup(noise=0.8, expected=10.0, rate=0.1)
    fedavg = fed.dp_fedavg(clip_norm=CLIP, noise_multiplier=0.8, sample_rate=0.1, num_clients=100)
    clients = _clients(12)
    ours, _ = fed.make_round(local, *fedavg)(state, clients)
    by_hand, _ = fed.make_round(local, privatizer, server)(state, clients)
    assert_trees_equal(ours.params, by_hand.params)
    assert ours.ledger == by_hand.ledger


def test_dp_fedadam_steps_adam_on_the_same_private_mean():
    adam = fdp.optim.adam(0.05, 0.9, 0.99, 1e-3)
    local, privatizer, _, state = _setup(noise=0.8, expected=10.0, rate=0.1, server=adam)
    fedadam = fed.dp_fedadam(
        clip_norm=CLIP, noise_multiplier=0.8, sample_rate=0.1, num_clients=100,
        server_learning_rate=0.05,
    )  # fmt: skip
    clients = _clients(12)
    ours, _ = fed.make_round(local, *fedadam)(state, clients)
    by_hand, _ = fed.make_round(local, privatizer, adam)(state, clients)
    assert_trees_equal(ours.params, by_hand.params)


def test_dp_fedavg_with_adaptive_clipping_spends_what_a_fixed_clip_spends():
    adaptive = fed.dp_fedavg(
        clip_norm=CLIP, noise_multiplier=0.8, sample_rate=0.1, num_clients=100,
        target_quantile=0.5,
    )  # fmt: skip
    local, _, _, state = _setup()
    state = fdp.TrainState.create(
        state.params, privatizer=adaptive.privatizer, optimizer=adaptive.server_optimizer,
        key=fdp.random.key(0),
    )  # fmt: skip
    state, _ = fed.make_round(local, *adaptive)(state, _clients(12))
    (record,) = state.ledger.records
    assert (record.noise_multiplier, record.sample_rate, record.steps) == (0.8, 0.1, 1)
    (clip_state,) = [s for s in state.privacy_state if isinstance(s, fdp.AdaptiveClipState)]
    assert float(clip_state.norms[0]) != CLIP  # the norm moved


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_clients=0), "num_clients"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(clip_norm=-1.0), "max_norm"),
        (dict(noise_multiplier=-0.5), "noise_multiplier"),
        # expected clients 10: the default count sigma 0.5 is too small for sigma 1.2
        (dict(noise_multiplier=1.2, target_quantile=0.5), "count_noise_multiplier"),
    ],
)
def test_dp_fedavg_refuses_bad_arguments(kwargs, match):
    args = dict(clip_norm=1.0, noise_multiplier=0.5, sample_rate=0.1, num_clients=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fed.dp_fedavg(**args)

"""The Flower adapter's server strategy (`FlowerRun`) on its own, without Flower's processes.

Sampling, the budget guard, rounds that release nothing, and the step from SecAgg+'s mean; the
node list is a stand-in for Flower's ClientManager. tests/test_flower.py runs the real processes.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.common import (  # noqa: E402
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

import funcdp as fdp  # noqa: E402
from funcdp.federated import make_server_update  # noqa: E402
from funcdp.federated.flower import FlowerRun, FuncdpClient, SecAggPlus  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "flower_app"))
from funcdp_flower_app import task  # noqa: E402

DEFAULTS = task.run_config_defaults()


class _Nodes:
    """Stands in for Flower's ClientManager in the strategy's own unit tests: nodes by id."""

    def __init__(self, count: int) -> None:
        self.nodes = {str(i): SimpleNamespace(node_id=1000 + i) for i in range(count)}

    def all(self):
        return self.nodes

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        return len(self.nodes) >= num_clients


def _strategy(config, **overrides):
    kwargs = dict(
        state=task.initial_state(config),
        privatizer=task.privatizer(config),
        server_optimizer=task.server_optimizer(),
        delta=config["delta"],
        secagg=SecAggPlus(),
        min_clients=2,
        wait_for_nodes=1,
        on_round=None,
    )
    return FlowerRun(**(kwargs | overrides))


def test_rounds_sample_clients_poisson_from_the_key_and_send_what_clients_check():
    config = dict(DEFAULTS, **{"sample-rate": 0.5, "num-clients": 400})
    run = _strategy(config)
    chosen = [proxy.node_id for proxy, _ in run.configure_fit(1, None, _Nodes(400))]
    again = [proxy.node_id for proxy, _ in _strategy(config).configure_fit(1, None, _Nodes(400))]
    assert chosen == again and 160 < len(chosen) < 240  # 200 +- 4 standard deviations
    instructions = run.configure_fit(1, None, _Nodes(400))[0][1]
    client = FuncdpClient(
        task.local_update, task.client_data(0, 0), privatizer=task.privatizer(config)
    )
    arrays, weight, metrics = client.fit(
        [a.copy() for a in parameters_to_ndarrays(instructions.parameters)], instructions.config
    )
    norm = math.sqrt(sum(float((a**2).sum()) for a in arrays))
    assert weight == 1 and metrics == {} and norm <= config["clip-norm"] * (1 + 1e-6)
    other = FuncdpClient(
        task.local_update,
        task.client_data(0, 0),
        privatizer=task.privatizer(dict(config, **{"clip-norm": 0.5})),
    )
    with pytest.raises(ValueError, match="sensitivity"):
        other.fit(parameters_to_ndarrays(instructions.parameters), instructions.config)


def test_the_ledgers_epsilon_equals_flowers_own_accountant_on_the_same_rounds():
    """Flower 1.42's RDP accountant (for its own DP strategies) on Poisson rounds at rate q."""
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    config = dict(DEFAULTS, **{"sample-rate": 0.25, "num-clients": 40})
    run = _strategy(config)
    flower = RdpAccountant(
        PrivacyConfig(
            target_delta=config["delta"],
            population_size=40,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON,
        )
    )
    for server_round in (1, 2, 3):
        run.configure_fit(server_round, None, _Nodes(40))  # launched or skipped: counted
        run.settle()
        flower.compose(
            GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=10, population_size=40)
        )
        ledger_rdp = fdp.epsilon(run.state.ledger, delta=config["delta"], method="rdp")
        assert ledger_rdp == pytest.approx(flower.get_privacy_spent().epsilon, rel=1e-9)
        assert run.epsilon() == fdp.epsilon(run.state.ledger, delta=config["delta"])  # PLD


def test_a_too_small_cohort_releases_nothing_and_is_still_counted():
    config = dict(DEFAULTS, **{"sample-rate": 0.01})
    run = _strategy(config)
    assert run.configure_fit(1, None, _Nodes(3)) == []  # 0 or 1 of 3 sampled, below 2
    assert run.state.step == 1 and run.state.ledger.steps == 1
    torch.testing.assert_close(run.state.params, task.initial_state(config).params, rtol=0, atol=0)
    assert run.skip_probability == pytest.approx(1 - 0.01**2, rel=1e-12)  # P[Bin(2, q) < 2]


def test_the_budget_refuses_a_round_before_any_client_is_asked():
    config = dict(DEFAULTS)
    one = fdp.dpsgd_epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5)
    run = _strategy(dict(config, **{"max-epsilon": one * 1.01}))
    assert len(run.configure_fit(1, None, _Nodes(3))) == 3
    run.settle()  # the round released nothing (no aggregate): it is still counted
    assert run.state.ledger.steps == 1
    assert run.configure_fit(2, None, _Nodes(3)) == []
    assert run.state.ledger.steps == 1 and run.epsilon() <= one * 1.01


def test_the_secure_mean_becomes_the_sum_and_an_impossible_sum_is_dropped():
    """SecAgg+ hands the server the mean over n clients; the server steps on n times it, as
    make_server_update on the sum; a sum above n C (not unmasked correctly) releases nothing."""
    config = dict(DEFAULTS)
    run = _strategy(config)
    instructions = run.configure_fit(1, None, _Nodes(3))
    assert len(instructions) == 3
    state = run.state
    clipped = {name: torch.full_like(p, 0.001) for name, p in state.params.items()}
    mean = [clipped[name].double().numpy() for name in state.params]  # each client sent it
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), 1, {})
    run.aggregate_fit(1, [(proxy, fit_res) for proxy, _ in instructions], [])
    total = {name: value * 3 for name, value in clipped.items()}
    expected = make_server_update(task.privatizer(config), task.server_optimizer())(state, total)
    torch.testing.assert_close(run.state.params, expected.params, rtol=0, atol=1e-6)
    assert run.state.ledger == expected.ledger

    instructions = run.configure_fit(2, None, _Nodes(3))
    huge = [np.full(p.shape, 10.0) for p in state.params.values()]
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(huge), 1, {})
    before = run.state
    assert run.aggregate_fit(2, [(proxy, fit_res) for proxy, _ in instructions], []) == (None, {})
    run.settle()  # counted, not applied
    assert run.state.ledger.steps == 2 and run.state.params is before.params


def test_bad_settings_are_refused_with_their_name():
    config = dict(DEFAULTS)
    no_account = fdp.chain(fdp.clip(0.3), fdp.aggregate(), fdp.gaussian_noise(1.0))
    with pytest.raises(ValueError, match=r"account\(q\)"):
        _strategy(config, privatizer=no_account)
    with pytest.raises(ValueError, match="min_clients must be an int >= 2, got 1"):
        _strategy(config, min_clients=1)
    with pytest.raises(ValueError, match="adaptive"):
        FuncdpClient(
            task.local_update,
            None,
            privatizer=fdp.chain(
                fdp.adaptive_clip(0.3, count_noise_multiplier=5.0, expected_batch_size=3.0),
                fdp.aggregate(),
            ),
        )


def test_a_normalization_other_than_the_expected_cohort_is_flagged(caplog):
    run = _strategy(dict(DEFAULTS))  # normalize(1.0 * 3)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run.configure_fit(1, None, _Nodes(5))
    assert "divides the noisy sum by 3, but q x 5 connected nodes expects 5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _strategy(dict(DEFAULTS)).configure_fit(1, None, _Nodes(3))
    assert "divides the noisy sum" not in caplog.text

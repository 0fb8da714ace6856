"""Tests for `funcdp fedavg` (funcdp/federated/command.py) and the simulation it runs."""

from __future__ import annotations

import re

import dp_accounting
import pytest
import torch

from funcdp import cli, datasets
from funcdp import random as fdr
from funcdp.federated.shards import label_shards
from funcdp.federated.simulation import FedRecipe, fit_federated

FINAL = re.compile(
    r"^final: test_accuracy=(\d\.\d{3}) epsilon=(\d+\.\d{2}) delta=(\S+) \(client-level\)$"
)
ROUND = re.compile(r"^round +(\d+)/(\d+) +clients=(\d+) +test_accuracy=(\d\.\d{3}) +epsilon=(\S+)$")


def test_fedavg_prints_rounds_and_a_final_line_with_the_accountants_epsilon(capsys):
    argv = ["fedavg", "--rounds", "4", "--report-every", "2", "--noise", "1.1"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("fedavg on digits: 1437 train rows dealt to 200 clients")
    rounds = [ROUND.match(line) for line in lines[1:-1]]
    assert all(rounds) and [int(m.group(1)) for m in rounds] == [2, 4]
    accuracy, epsilon, delta = (float(g) for g in FINAL.match(lines[-1]).groups())
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 4
    )
    reference = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert epsilon == pytest.approx(reference, abs=0.006)
    assert delta == 1e-5
    assert 0.0 <= accuracy <= 1.0


def test_default_fedavg_learns_the_digits():
    """The command's defaults: 30 rounds of DP-FedAvg reach well above chance (0.1)."""
    _, reports = fit_federated(datasets.load_digits(), FedRecipe(), report_every=30)
    (last,) = reports
    assert last.round == 30
    assert last.test_accuracy > 0.6
    assert 4.0 < last.epsilon < 6.0


def test_fedadam_and_adaptive_clipping_run_and_are_deterministic():
    data = datasets.load_digits()
    recipe = FedRecipe(
        rounds=3, server="fedadam", server_lr=0.05, target_quantile=0.5, chunk_size=7
    )
    generator_state = torch.random.get_rng_state()
    state_a, reports_a = fit_federated(data, recipe, seed=3)
    assert torch.equal(torch.random.get_rng_state(), generator_state)  # the key, not torch's RNG
    state_b, reports_b = fit_federated(data, recipe, seed=3)
    assert reports_a == reports_b
    for name in state_a.params:
        assert torch.equal(state_a.params[name], state_b.params[name])
    _, other = fit_federated(data, recipe, seed=4)
    assert other != reports_a


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--client-rate", "1.5"], "sample_rate"),
        (["--noise", "-1"], "noise_multiplier"),
        (["--clip", "0"], "max_norm"),
        (["--clients", "0"], "num_clients"),
        (["--rounds", "0"], "rounds"),
        (["--local-steps", "0"], "local_steps"),
        (["--report-every", "0"], "report_every"),
        (["--clients", "2000"], "num_clients * shards_per_client"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_naming_them(capsys, argv, name):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fedavg", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("funcdp fedavg: error: ") and name in err


def test_label_shards_give_each_client_few_labels():
    labels = datasets.load_digits().y_train
    clients = label_shards(labels, num_clients=100, shards_per_client=2, key=fdr.key(0))
    assert clients.shape == labels.shape and set(clients.tolist()) == set(range(100))
    sizes = torch.bincount(clients, minlength=100)
    assert int(sizes.max() - sizes.min()) <= 2  # shards of nearly equal size
    labels_per_client = [len(labels[clients == c].unique()) for c in range(100)]
    assert max(labels_per_client) <= 4  # two shards, each straddling at most two labels
    assert sum(n <= 2 for n in labels_per_client) >= 80  # mostly one or two classes: non-iid
    again = label_shards(labels, num_clients=100, shards_per_client=2, key=fdr.key(0))
    assert torch.equal(clients, again)
    other = label_shards(labels, num_clients=100, shards_per_client=2, key=fdr.key(1))
    assert not torch.equal(clients, other)

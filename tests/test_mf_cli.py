"""`funcdp train --mechanism bandmf|blt|tree`: funcdp/mf/recipe.py and its flags in cli.py."""

from __future__ import annotations

import re

import pytest
import torch

import funcdp as fdp
from funcdp import cli, datasets, mf
from funcdp.mf.choose import choose_strategy
from funcdp.mf.recipe import build_strategy, fit_correlated
from funcdp.recipe import Recipe

FINAL = re.compile(r"^final: test_accuracy=(\d\.\d{3}) epsilon=(\d+\.\d{2}) delta=(\S+)$")


@pytest.mark.parametrize("mechanism", ["bandmf", "blt", "tree"])
def test_train_with_correlated_noise_reports_accuracy_and_epsilon(capsys, mechanism):
    argv = ["train", "--mechanism", mechanism, "--epochs", "2", "--batch-size", "64", "--lr", "1"]
    assert cli.main([*argv, "--bands", "3"] if mechanism == "bandmf" else argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("1437 train / 360 test examples") and "44 steps" in lines[0]
    accuracy, epsilon, delta = (float(g) for g in FINAL.match(lines[-1]).groups())
    assert epsilon <= 3.0 and delta == 1e-5
    assert accuracy > 0.6


def test_fit_correlated_accounts_the_strategy_and_is_deterministic():
    split = datasets.load_digits()
    recipe = Recipe(epochs=2, batch_size=64, lr=1.0)
    first = fit_correlated(split, recipe, mechanism="bandmf", size=3, seed=1)
    again = fit_correlated(split, recipe, mechanism="bandmf", size=3, seed=1)
    strategy = mf.banded(44, 3)
    q = 64 * 3 / 1437
    (record,) = first.state.ledger.records
    assert record == fdp.LedgerRecord(first.noise_multiplier, q, 44, True, *mf.mechanism(strategy))
    assert first.epsilon == fdp.epsilon(first.state.ledger, delta=1e-5) <= 3.0
    assert torch.equal(first.model.weight, again.model.weight)


def test_build_strategy_patterns_and_refusals():
    assert build_strategy("bandmf", steps=40, steps_per_epoch=10, size=4).min_separation == 4
    blt = build_strategy("blt", steps=40, steps_per_epoch=10, size=2)
    assert (blt.min_separation, blt.max_participations, len(blt.thetas)) == (10, 4, 2)
    with pytest.raises(ValueError, match="bands must be at most the steps of one epoch \\(10\\)"):
        build_strategy("bandmf", steps=40, steps_per_epoch=10, size=11)
    with pytest.raises(ValueError, match="mechanism must be one of"):
        build_strategy("dpftrl", steps=40, steps_per_epoch=10, size=2)


def test_bad_bands_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--mechanism", "bandmf", "--bands", "100", "--batch-size", "64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bands must be at most the steps of one epoch (22), got 100" in err[0]


def test_bands_auto_is_the_default_and_trains_with_the_chosen_strategy(capsys):
    # q = 480 / 1437, 3 steps per epoch: the candidates are 1 and 2 bands
    argv = ["train", "--mechanism", "bandmf", "--epochs", "2", "--batch-size", "480"]
    assert cli.main([*argv, "--epsilon", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    choice = choose_strategy(epsilon=8.0, delta=1e-5, sample_rate=480 / 1437, steps=6)
    bands = choice.strategy.bands
    assert bands > 1  # at epsilon 8 correlated noise is predicted better than DP-SGD here
    assert lines[0].endswith(
        f"noise multiplier {choice.noise_multiplier:.4g} (pld); BandMF, {bands} bands (auto)"
    )
    assert FINAL.match(lines[-1])
    # with little budget the choice is one band, DP-SGD, and the header says so
    assert cli.main([*argv, "--epsilon", "0.5"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.endswith("; BandMF, 1 band: DP-SGD's independent noise (auto)")


def test_fit_correlated_auto_records_the_choice():
    split = datasets.load_digits()
    recipe = Recipe(epsilon=0.3, epochs=2, batch_size=360, lr=1.0)
    result = fit_correlated(split, recipe, mechanism="bandmf", size="auto")
    choice = choose_strategy(epsilon=0.3, delta=1e-5, sample_rate=360 / 1437, steps=8)
    assert choice.strategy == mf.banded(8, 1)  # little budget: DP-SGD's identity
    (record,) = result.state.ledger.records
    assert record == fdp.LedgerRecord(
        choice.noise_multiplier, 360 / 1437, 8, True, *mf.mechanism(choice.strategy)
    )
    assert result.epsilon <= 0.3 + 1e-6
    with pytest.raises(ValueError, match="give mechanism='blt' an int size"):
        fit_correlated(split, recipe, mechanism="blt", size="auto")
    with pytest.raises(ValueError, match="mechanism must be one of"):
        fit_correlated(split, recipe, mechanism="dpftrl", size="auto")


def test_bands_must_be_auto_or_a_positive_int(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--mechanism", "bandmf", "--bands", "many"])
    assert exit_info.value.code == 2
    assert "argument --bands: expected an integer, got 'many'" in capsys.readouterr().err

"""Tests of the `funcdp` command line (funcdp/cli.py, funcdp/__main__.py) and funcdp/datasets.py."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcdp as fdp
from funcdp import cli, datasets
from funcdp.recipe import Recipe, build_model, fit

FINAL = re.compile(r"^final: test_accuracy=(\d\.\d{3}) epsilon=(\d+\.\d{2}) delta=(\S+)$")
ROOT = Path(__file__).resolve().parents[1]


def _final(stdout: str) -> tuple[float, float, float]:
    lines = stdout.strip().splitlines()
    match = FINAL.match(lines[-1])
    assert match, f"last line is not a well-formed summary: {lines[-1]!r}"
    return tuple(float(g) for g in match.groups())


def _run(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def _test_accuracy(model: torch.nn.Module, split: datasets.Split) -> float:
    with torch.no_grad():
        return float((model(split.x_test).argmax(1) == split.y_test).float().mean())


# --- funcdp train ----------------------------------------------------------------------------


def test_python_m_funcdp_train_prints_epochs_and_a_final_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "funcdp", "train", "--epochs", "2", "--seed", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2
    assert all("test_accuracy=" in line and "epsilon=" in line for line in epochs)
    accuracy, spent, delta = _final(proc.stdout)
    assert 0.0 <= accuracy <= 1.0
    # Sigma is calibrated for the 2-epoch run, so it spends (almost exactly) the whole budget.
    assert 2.9 <= spent <= 3.0
    assert delta == 1e-5
    assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr


def test_default_train_reaches_88_percent_within_epsilon_3(capsys):
    accuracy, spent, delta = _final(_run(capsys, "train"))
    assert accuracy >= 0.88
    assert spent <= 3.0
    assert delta == 1e-5


@pytest.mark.slow
def test_default_train_mean_accuracy_over_seeds_0_1_2_is_at_least_90_percent(capsys):
    results = [_final(_run(capsys, "train", "--seed", str(seed))) for seed in range(3)]
    assert np.mean([acc for acc, _, _ in results]) >= 0.90
    assert all(spent <= 3.0 for _, spent, _ in results)


def test_fit_reports_the_ledgers_epsilon_and_is_deterministic():
    split = datasets.load_digits()
    recipe = Recipe(epochs=1)
    first = fit(split, recipe, seed=3)
    again = fit(split, recipe, seed=3)
    other = fit(split, recipe, seed=4)
    q = recipe.batch_size / len(split.y_train)
    steps = round(1 / q)
    assert first.state.step == steps
    assert first.state.ledger.records == (fdp.LedgerRecord(first.noise_multiplier, q, steps),)
    assert first.noise_multiplier == fdp.calibrate_noise(
        target_epsilon=3.0, delta=1e-5, sample_rate=q, steps=steps
    )
    assert first.epsilon == fdp.epsilon(first.state.ledger, delta=1e-5) <= 3.0
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name])
    assert not torch.equal(first.model.weight, other.model.weight)


def test_save_writes_a_state_dict_that_loads_into_the_model(tmp_path, capsys):
    path = tmp_path / "model.pt"
    out = _run(capsys, "train", "--epochs", "1", "--save", str(path))
    accuracy, _, _ = _final(out)
    model = build_model(64, 10)
    model.load_state_dict(torch.load(path))
    # The saved model is the trained one: it scores the printed accuracy on the test split.
    assert _test_accuracy(model, datasets.load_digits()) == pytest.approx(accuracy, abs=5e-4)


def _blobs(n: int = 400, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    centers = np.eye(3, d) * 3.0
    return (centers[y] + rng.normal(0.0, 0.3, size=(n, d))).astype(np.float32), y


def test_data_trains_on_a_synthetic_npz(tmp_path, capsys):
    x, y = _blobs()
    np.savez(tmp_path / "blobs.npz", x=x, y=y)
    path = tmp_path / "model.pt"
    argv = ["--epochs", "10", "--batch-size", "64", "--lr", "1", "--save", str(path)]
    out = _run(capsys, "train", "--data", str(tmp_path / "blobs.npz"), *argv)
    accuracy, spent, _ = _final(out)
    assert accuracy >= 0.9 and spent <= 3.0
    model = build_model(5, 3)
    model.load_state_dict(torch.load(path))
    assert _test_accuracy(model, datasets.split(x, y)) == pytest.approx(accuracy, abs=5e-4)


def _blobs_argv(tmp_path: Path, save: Path) -> list[str]:
    """A one-epoch `funcdp train` on 400 synthetic examples (about a second), saving to `save`."""
    data = tmp_path / "data" / "blobs.npz"
    data.parent.mkdir(exist_ok=True)
    x, y = _blobs()
    np.savez(data, x=x, y=y)
    return [
        "train",
        "--data",
        str(data),
        "--save",
        str(save),
        *"--epochs 1 --batch-size 64".split(),
    ]


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("missing/model.pt", "does not exist"),
        ("missing/deeper/model.pt", "does not exist"),
        ("existing_dir", "is a directory"),
        ("existing_dir/", "is a directory"),
        ("a_file/model.pt", "does not exist"),
        (None, "expected a file path"),
    ],
)
def test_save_to_a_bad_path_exits_2_before_training(
    tmp_path, monkeypatch, capsys, relative, message
):
    (tmp_path / "existing_dir").mkdir()
    (tmp_path / "a_file").write_text("not a directory")
    calls = []
    monkeypatch.setattr(cli, "fit", lambda *args, **kwargs: calls.append(args) or 1 / 0)
    save = "" if relative is None else os.path.join(tmp_path, relative)  # keeps a trailing /
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--epochs", "1", "--save", save])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert not calls and "epoch" not in captured.out and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("funcdp train: error: argument --save: ")
    assert message in lines[0], captured.err
    assert sorted(os.listdir(tmp_path)) == ["a_file", "existing_dir"]
    assert os.listdir(tmp_path / "existing_dir") == []


def test_save_to_a_directory_that_is_not_writable_exits_2_before_training(
    tmp_path, monkeypatch, capsys
):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root may write anyway: have the check see what a user would
        access = os.access
        monkeypatch.setattr(
            os, "access", lambda path, mode: access(path, mode) and Path(path) != locked
        )
    monkeypatch.setattr(cli, "fit", lambda *args, **kwargs: 1 / 0)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--save", str(locked / "model.pt")])
    finally:
        locked.chmod(0o700)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (
        f"funcdp train: error: argument --save: directory {str(locked)!r} is not writable"
    )


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failed_save_leaves_the_existing_file_and_no_temporary_file(
    tmp_path, monkeypatch, capsys, error
):
    out = tmp_path / "out"
    out.mkdir()
    path = out / "model.pt"
    path.write_bytes(b"the previous run's model")
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        # Writes part of a checkpoint where it was told to, then fails (disk full, Ctrl-C).
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as w:
            real_save({"partial": torch.zeros(3)}, w)
            w.flush()
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(error)):
        cli.main(_blobs_argv(tmp_path, path))
    assert path.read_bytes() == b"the previous run's model"
    assert os.listdir(out) == ["model.pt"]
    assert "saved" not in capsys.readouterr().out


def test_save_replaces_an_existing_file_with_a_loadable_state_dict(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    path = out / "model.pt"
    path.write_bytes(b"the previous run's model")
    stdout = _run(capsys, *_blobs_argv(tmp_path, path))
    assert f"saved the model's state_dict to {path}" in stdout
    assert os.listdir(out) == ["model.pt"]
    model = build_model(5, 3)
    model.load_state_dict(torch.load(path))
    accuracy, _, _ = _final(stdout)
    assert _test_accuracy(model, datasets.split(*_blobs())) == pytest.approx(accuracy, abs=5e-4)


def test_progress_bar_draws_on_a_tty_only():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = cli._Progress(stream, width=10)
        bar.update(3, 6)
        bar.clear()
    assert "[#####.....] step 3/6" in tty.getvalue()
    assert pipe.getvalue() == ""


# --- funcdp epsilon / funcdp noise -----------------------------------------------------------


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_epsilon_prints_dpsgd_epsilon(capsys, method):
    out = _run(
        capsys, "epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.1",
        "--steps", "300", "--delta", "1e-6", "--accountant", method,
    )  # fmt: skip
    assert float(out) == fdp.dpsgd_epsilon(
        noise_multiplier=1.1, sample_rate=0.01, steps=300, delta=1e-6, method=method
    )


def test_noise_prints_calibrate_noise(capsys):
    out = _run(capsys, "noise", "--epsilon", "2", "--sample-rate", "0.02", "--steps", "500")
    sigma = float(out)
    assert sigma == fdp.calibrate_noise(  # both default to PLD
        target_epsilon=2.0, delta=1e-5, sample_rate=0.02, steps=500
    )
    assert fdp.dpsgd_epsilon(noise_multiplier=sigma, sample_rate=0.02, steps=500, delta=1e-5) <= 2.0


BAD_ARGUMENTS = [
    (["train", "--epsilon", "-1"], "--epsilon"),
    (["train", "--delta", "1.5"], "--delta"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--epochs", "2.5"], "--epochs"),
    (["train", "--batch-size", "100000"], "--batch-size"),
    (["train", "--clip", "nan"], "--clip"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--accountant", "moments"], "--accountant"),
    (["train", "--data", "/no/such/file.npz"], "--data"),
    (
        ["epsilon", "--sample-rate", "1.5", "--noise-multiplier", "1", "--steps", "10"],
        "--sample-rate",
    ),
    (
        ["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "-1", "--steps", "10"],
        "--noise-multiplier",
    ),
    (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1"], "--steps"),
    (["noise", "--epsilon", "0", "--sample-rate", "0.1", "--steps", "10"], "--epsilon"),
    (
        ["noise", "--epsilon", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "0"],
        "--delta",
    ),
    (["frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize(("argv", "argument"), BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line_naming_the_argument(capsys, argv, argument):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and argument in lines[0], captured.err


def test_bad_argument_in_a_subprocess_is_a_message_not_a_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "funcdp",
            "noise",
            "--epsilon",
            "1",
            "--sample-rate",
            "2",
            "--steps",
            "5",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("funcdp noise: error: argument --sample-rate: must be in (0, 1]")
    assert "Traceback" not in proc.stderr


def test_a_subcommand_is_wired_in_by_one_registry_entry(monkeypatch, capsys):
    def add_arguments(parser):
        parser.add_argument("--level", type=int, required=True)

    def run(args):
        print(f"checked at level {args.level}")
        return 7

    entry = cli.Subcommand("check", "Check a run.", add_arguments, run)
    monkeypatch.setattr(cli, "_subcommands", lambda original=cli._subcommands: [*original(), entry])
    assert cli.main(["check", "--level", "4"]) == 7
    assert capsys.readouterr().out == "checked at level 4\n"
    assert (
        cli.main(["epsilon", "--sample-rate", "1", "--noise-multiplier", "0", "--steps", "1"]) == 0
    )
    assert capsys.readouterr().out.strip() == "inf"


# --- funcdp/datasets.py ----------------------------------------------------------------------


def test_digits_are_scaled_by_their_known_range_and_split_80_20():
    from sklearn.datasets import load_digits

    raw = load_digits()
    split = datasets.load_digits()
    assert (len(split.y_train), len(split.y_test)) == (1437, 360)
    assert split.num_features == 64 and split.num_classes == 10
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.long
    # Every example lands in exactly one part, divided by 16 and nothing else.
    x = torch.cat([split.x_train, split.x_test]).double() * 16
    y = torch.cat([split.y_train, split.y_test])
    order = np.lexsort(np.column_stack([raw.data, raw.target]).T)
    mine = np.lexsort(np.column_stack([x.numpy(), y.numpy()]).T)
    assert np.array_equal(x.numpy()[mine], raw.data[order])
    assert np.array_equal(y.numpy()[mine], raw.target[order])


@settings(max_examples=40, derandomize=True, deadline=None)
@given(st.integers(min_value=2, max_value=300))
def test_split_is_a_fixed_partition_with_ceil_20_percent_test(n):
    x = np.arange(n, dtype=np.float32)[:, None]
    y = np.arange(n) % 2
    first, second = datasets.split(x, y), datasets.split(x, y)
    assert len(first.y_test) == -(-n // 5) and len(first.y_train) == n - -(-n // 5)
    rows = torch.cat([first.x_train, first.x_test]).flatten().long()
    assert sorted(rows.tolist()) == list(range(n))
    assert torch.equal(first.x_test, second.x_test)  # the split seed is fixed


def test_npz_with_num_classes_and_label_checks(tmp_path):
    x, y = _blobs(n=50)
    np.savez(tmp_path / "k.npz", x=x, y=y, num_classes=np.int64(7))
    assert datasets.load_npz(tmp_path / "k.npz").num_classes == 7
    np.savez(tmp_path / "bad.npz", x=x, y=y, num_classes=np.int64(2))
    with pytest.raises(ValueError, match="num_classes=2"):
        datasets.load_npz(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 2), np.float32)}, "must hold arrays 'x' and 'y'"),
        ({"x": np.zeros((4, 2), np.int64), "y": np.zeros(4, np.int64)}, "x must be a float array"),
        ({"x": np.zeros(4, np.float32), "y": np.zeros(4, np.int64)}, r"shape \[N, D\]"),
        ({"x": np.full((4, 2), np.nan, np.float32), "y": np.zeros(4, np.int64)}, "finite"),
        ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(4, np.float32)}, "y must be an int"),
        ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(3, np.int64)}, "same number of rows"),
        ({"x": np.zeros((4, 2), np.float32), "y": np.array([0, 1, -1, 0])}, "y must be >= 0"),
        ({"x": np.zeros((1, 2), np.float32), "y": np.zeros(1, np.int64)}, "at least 2 examples"),
        ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(4, np.int64)}, "num_classes >= 2"),
    ],
)
def test_bad_npz_is_refused_with_a_message(tmp_path, arrays, message):
    np.savez(tmp_path / "data.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        datasets.load_npz(tmp_path / "data.npz")


def test_a_file_that_is_not_an_npz_is_refused(tmp_path):
    (tmp_path / "notes.npz").write_text("not an archive")
    np.save(tmp_path / "single.npy", np.zeros(3))
    for name in ("notes.npz", "single.npy"):
        with pytest.raises(ValueError, match="not a readable .npz"):
            datasets.load_npz(tmp_path / name)


def test_a_library_value_error_in_a_subcommand_is_a_one_line_message(capsys):
    # funcdp audit hands --sample-rate to the library, whose ValueError names it.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", "--sample-rate", "2", "--num-canaries", "10", "--steps", "1"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("funcdp audit: error: ") and "sample_rate" in captured.err
    assert len(captured.err.strip().splitlines()) == 1

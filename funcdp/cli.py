"""The `funcdp` command: `train` (DP-SGD on a small data set), `epsilon` and `noise` calculators.

Each subcommand is a `Subcommand(name, help, add_arguments, run)` in `_subcommands()`; adding one
(say `funcdp audit` from `funcdp/audit/command.py`) is an import and one entry there. A run returns
the exit code: 0 on success, 2 for bad arguments, with a one-line message naming the argument.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

import funcdp as fdp
from funcdp import datasets
from funcdp._cli_types import Parser, non_negative, positive, positive_or_auto
from funcdp._cli_types import delta as delta_type
from funcdp._cli_types import sample_rate as sample_rate_type
from funcdp.audit import command as audit_command
from funcdp.data import default_steps
from funcdp.federated import command as fedavg_command
from funcdp.mf.recipe import MECHANISMS, fit_correlated
from funcdp.recipe import Recipe, TrainResult, check_batch_size, fit

ACCOUNTANTS = ("rdp", "pld")


class Subcommand(NamedTuple):
    """A subcommand: `add_arguments(parser)` declares its flags, `run(args)` returns an exit code."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A bad value found after parsing (e.g. a batch larger than the data); exits with code 2.

    A `ValueError` from the library (which names the argument) exits the same way.
    """


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `funcdp` command line on `argv` (default `sys.argv[1:]`); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # dp_accounting logs a warning for each RDP order it drops; dropping one only loosens the
    # bound, and the warnings would bury the command's output.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return args.run(args)
    except (CommandError, ValueError) as error:
        # funcdp's ValueErrors name the argument and its allowed range: a message, not a trace.
        parser.exit(2, f"funcdp {args.command}: error: {error}\n")
    finally:
        absl_logger.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subparser per entry of `_subcommands()`."""
    parser = Parser(prog="funcdp", description="A functional differential-privacy engine.")
    parser.add_argument("--version", action="version", version=f"funcdp {fdp.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _subcommands():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _subcommands() -> list[Subcommand]:
    """The registry. A module with `add_arguments(parser)` and `run(args) -> int` joins it by an
    import here and one entry: `Subcommand("audit", "...", command.add_arguments, command.run)`."""
    return [
        Subcommand(
            "train",
            "Train a small model with DP-SGD and report its accuracy and epsilon.",
            _train_arguments,
            train,
        ),
        Subcommand(
            "epsilon", "Epsilon spent by DP-SGD with Poisson sampling.", _epsilon_arguments, epsilon
        ),
        Subcommand(
            "noise", "Noise multiplier that reaches a target epsilon.", _noise_arguments, noise
        ),
        Subcommand(
            "audit",
            "Audit a DP run on the digits: the accountant's epsilon beside an empirical lower bound.",
            audit_command.add_arguments,
            audit_command.run,
        ),
        Subcommand(
            "fedavg",
            "DP-FedAvg on the digits split across non-iid clients: accuracy and client-level epsilon.",
            fedavg_command.add_arguments,
            fedavg_command.run,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# funcdp train


_TRAIN_DESCRIPTION = """\
Train a small model with DP-SGD (per-example clipping, Gaussian noise, Poisson sampling) on
scikit-learn's digits (pixels divided by 16, their known range), split 80/20 into train/test
with a fixed seed. Sigma is calibrated so that the whole run spends at most --epsilon at --delta.
Per epoch it prints the test loss, the test accuracy and the epsilon spent (never statistics of
the private training data, which the guarantee does not cover); it ends with one line:
  final: test_accuracy=0.912 epsilon=2.98 delta=1e-05"""

_DATA_HELP = (
    "train on an .npz file instead of the digits: 'x', float features [N, D] ALREADY SCALED by "
    "you (by their known range, not by statistics of the data); 'y', int labels [N] in 0..K-1 "
    "(K = max(y)+1, or a scalar int 'num_classes' in the file); split 80/20 like the digits"
)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = _TRAIN_DESCRIPTION
    d = Recipe()
    flags = [
        ("--epsilon", positive(float), d.epsilon, "target epsilon, > 0"),
        ("--delta", delta_type, d.delta, "target delta, in (0, 1)"),
        ("--epochs", positive(int), d.epochs, "epochs of round(1/q) Poisson steps each"),
        ("--batch-size", positive(int), d.batch_size, "EXPECTED batch size; q = it / n_train"),
        ("--clip", positive(float), d.clip, "per-example L2 clipping norm, > 0"),
        ("--lr", positive(float), d.lr, "SGD learning rate, > 0"),
        ("--hidden", non_negative(int), d.hidden, "hidden units of an MLP; 0: linear model"),
        ("--seed", non_negative(int), 0, "seed of the initialization, sampling and noise"),
    ]
    for flag, kind, default, text in flags:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default %(default)g)")
    parser.add_argument(
        "--accountant", choices=ACCOUNTANTS, default=d.accountant, help="default %(default)s"
    )
    parser.add_argument(
        "--mechanism",
        choices=("dpsgd", *MECHANISMS),
        default="dpsgd",
        help="noise independent across steps (dpsgd) or correlated: bandmf (cyclic Poisson over "
        "--bands groups, amplified), blt or tree (one step per epoch); default %(default)s",
    )
    parser.add_argument(
        "--bands",
        type=positive_or_auto(int),
        default="auto",
        help="BandMF's bands, or auto: the bands (1 is DP-SGD) whose calibrated noise has the "
        "smallest predicted error for this epsilon, delta, sample rate and steps "
        "(funcdp.mf.choose_strategy); default %(default)s",
    )
    parser.add_argument(
        "--buffers", type=positive(int), default=4, help="BLT's buffers (default 4)"
    )
    parser.add_argument("--data", metavar="PATH", help=_DATA_HELP)
    parser.add_argument(
        "--save",
        metavar="PATH",
        help="write the trained model's state_dict here (checked before training; written to a "
        "temporary file beside PATH and renamed onto it, so PATH is never left half-written)",
    )


def _mechanism_note(args: argparse.Namespace, record) -> str:
    """ "; BandMF, 2 bands (auto)" and the like for the header line; "" for DP-SGD."""
    if args.mechanism == "bandmf":
        chosen = " (auto)" if args.bands == "auto" else ""
        bands = record.min_separation
        if bands == 1:
            return f"; BandMF, 1 band: DP-SGD's independent noise{chosen}"
        return f"; BandMF, {bands} bands{chosen}"
    if args.mechanism == "blt":
        return f"; BLT, {args.buffers} buffers"
    return "; tree" if args.mechanism == "tree" else ""


def train(args: argparse.Namespace) -> int:
    """`funcdp train`: trains, prints one line per epoch, then the `final:` summary line."""
    recipe = Recipe(
        epsilon=args.epsilon,
        delta=args.delta,
        epochs=args.epochs,
        batch_size=args.batch_size,
        clip=args.clip,
        lr=args.lr,
        hidden=args.hidden,
        accountant=args.accountant,
    )
    if args.save is not None:
        _check_save_path(args.save)
    try:
        data = datasets.load_npz(args.data) if args.data else datasets.load_digits()
    except ValueError as error:
        raise CommandError(f"argument --data: {error}") from None
    try:
        check_batch_size(recipe, len(data.y_train))
    except ValueError as error:
        raise CommandError(f"argument --batch-size: {error}") from None
    group = _join_torchrun()
    lead = group is None or dist.get_rank(group) == 0  # under torchrun, rank 0 speaks
    progress = _Progress(sys.stderr if lead else None)

    def report(epoch: int, result: TrainResult) -> None:
        if not lead:
            return
        progress.clear()
        if epoch == 1:
            (record,) = result.state.ledger.records
            steps = recipe.epochs * default_steps(recipe.batch_size / len(data.y_train))
            world = "" if group is None else f", {dist.get_world_size(group)} processes"
            print(
                f"{len(data.y_train)} train / {len(data.y_test)} test examples; sample rate "
                f"{record.sample_rate:.4g}, {steps} steps, noise multiplier "
                f"{result.noise_multiplier:.4g} ({recipe.accountant}){world}"
                f"{_mechanism_note(args, record)}"
            )
        print(
            f"epoch {epoch:>{len(str(recipe.epochs))}}/{recipe.epochs}  "
            f"test_loss={result.test_loss:.4f}  test_accuracy={result.test_accuracy:.3f}  "
            f"epsilon={result.epsilon:.2f}",
            flush=True,
        )

    if args.mechanism == "dpsgd":
        train_fn = fit
    else:
        size = args.bands if args.mechanism == "bandmf" else args.buffers
        train_fn = functools.partial(fit_correlated, mechanism=args.mechanism, size=size)
    try:
        result = train_fn(
            data,
            recipe,
            seed=args.seed,
            on_epoch=report,
            on_step=progress.update,
            process_group=group,
        )
    finally:
        if group is not None:
            dist.destroy_process_group()
    progress.clear()
    if not lead:
        return 0
    if args.save is not None:
        _save(result.model.state_dict(), args.save)
        print(f"saved the model's state_dict to {args.save}")
    print(
        f"final: test_accuracy={result.test_accuracy:.3f} epsilon={result.epsilon:.2f} "
        f"delta={recipe.delta:g}",
        flush=True,
    )
    return 0


def _check_save_path(path: str) -> None:
    """Raises CommandError unless `path` names a file that can be written: fails before training."""
    if not path:
        raise CommandError("argument --save: expected a file path, got ''")
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise CommandError(f"argument --save: {path!r} is a directory, not a file path")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CommandError(f"argument --save: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CommandError(f"argument --save: directory {directory!r} is not writable")


def _save(state_dict: dict, path: str) -> None:
    """Writes `state_dict` atomically: to a temporary file beside `path`, renamed onto `path`.

    On any failure (an exception, KeyboardInterrupt) the temporary file is removed, and a file
    already at `path` keeps its bytes: os.replace swaps in the whole new file or nothing.
    """
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never write into someone else's file; mode 0o666 minus the umask, as open() gives.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    descriptor = os.open(temporary, flags, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(state_dict, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _join_torchrun() -> Any:
    """The default process group when started by torchrun (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.group.WORLD


class _Progress:
    """A one-line progress bar on a terminal; silent when the stream is not a TTY."""

    def __init__(self, stream: Any, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.active = stream is not None and bool(getattr(stream, "isatty", lambda: False)())

    def update(self, done: int, total: int) -> None:
        if not self.active:
            return
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] step {done}/{total}")
        self.stream.flush()

    def clear(self) -> None:
        if self.active:
            self.stream.write("\r" + " " * (self.width + 30) + "\r")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# funcdp epsilon / funcdp noise


def _calculator_arguments(parser: argparse.ArgumentParser, first: tuple) -> None:
    flags = [
        first,
        ("--sample-rate", sample_rate_type, None, "Poisson sampling rate q, in (0, 1]"),
        ("--steps", positive(int), None, "number of DP-SGD steps, > 0"),
        ("--delta", delta_type, Recipe().delta, "delta, in (0, 1) (default %(default)g)"),
    ]
    for flag, kind, default, text in flags:
        parser.add_argument(flag, type=kind, default=default, required=default is None, help=text)
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="pld", help="default pld")


def _epsilon_arguments(parser: argparse.ArgumentParser) -> None:
    sigma = ("--noise-multiplier", non_negative(float), None, "noise std / clip norm, >= 0")
    _calculator_arguments(parser, sigma)


def _noise_arguments(parser: argparse.ArgumentParser) -> None:
    _calculator_arguments(parser, ("--epsilon", positive(float), None, "target epsilon, > 0"))


def epsilon(args: argparse.Namespace) -> int:
    """`funcdp epsilon`: prints the epsilon of the DP-SGD run (full precision, one number)."""
    value = fdp.dpsgd_epsilon(
        noise_multiplier=args.noise_multiplier,
        sample_rate=args.sample_rate,
        steps=args.steps,
        delta=args.delta,
        method=args.accountant,
    )
    print(repr(value))
    return 0


def noise(args: argparse.Namespace) -> int:
    """`funcdp noise`: prints the smallest noise multiplier reaching --epsilon (one number)."""
    try:
        value = fdp.calibrate_noise(
            target_epsilon=args.epsilon,
            delta=args.delta,
            sample_rate=args.sample_rate,
            steps=args.steps,
            method=args.accountant,
        )
    except (ValueError, RuntimeError) as error:
        raise CommandError(
            f"no noise multiplier reaches --epsilon {args.epsilon:g}: {error}"
        ) from None
    print(repr(value))
    return 0

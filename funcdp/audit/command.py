"""`funcdp audit`: audit a DP-SGD training run on the built-in digits data set.

The run is an ordinary `funcdp` training run (`PoissonLoader`, `make_train_step`, the privatizer
chain, `sgd`), with Dirac canaries mixed into the data: the model's parameters get
`num_canaries` padding coordinates that the model never reads, and canary i is an example whose
loss is `canary_norm` times padding coordinate i, so its gradient is a Dirac canary. Each
canary joins the data set with probability 1/2 and is then sampled, clipped, noised and
accounted like every other example. Its score is minus its padding coordinate after training
divided by the learning rate: the sum over steps of the privatized gradient on its coordinate.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import funcdp as fdp
from funcdp import datasets
from funcdp import random as fdr
from funcdp.audit.bounds import (
    guess_from_scores,
    one_run_ceiling,
    one_run_gaussian_ceiling,
)
from funcdp.audit.canaries import (
    CANARY_PARAMETER,
    draw_included,
    with_canary_parameter,
    without_canary_parameter,
)


class TrainingAudit(NamedTuple):
    """The outcome of `audit_training`.

    Attributes:
      epsilon: the accountant's epsilon for the run's ledger at delta.
      noise_multiplier: sigma of the run.
      epsilon_lower_bound, num_guesses, num_correct: the audit (see `guess_from_scores`).
      scores: float64 tensor [m]; included: bool tensor [m].
      test_accuracy: accuracy of the trained model on the held-out digits.
    """

    epsilon: float
    noise_multiplier: float
    epsilon_lower_bound: float
    num_guesses: int
    num_correct: int
    scores: torch.Tensor
    included: torch.Tensor
    test_accuracy: float


def audit_training(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    num_canaries: int,
    max_norm: float = 1.0,
    learning_rate: float = 2.0,
    seed: int = 0,
    confidence: float = 0.95,
) -> TrainingAudit:
    """Trains a small MLP on digits with DP-SGD and Dirac canaries, and audits the run.

    The data are `funcdp.datasets.load_digits()` (pixels / 16, the fixed 80/20 split of
    `funcdp train`); the test accuracy is measured on the held-out 20%.

    The noise multiplier is calibrated with `funcdp.calibrate_noise` for `target_epsilon`; the
    epsilon reported is the accountant's, read from the trained state's ledger.
    """
    x_train, y_train, x_test, y_test, _ = datasets.load_digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    apply_fn, params, buffers = fdp.functionalize(model)
    params = with_canary_parameter(params, num_canaries)
    include_key, loader_key, train_key = fdr.split(fdr.key(seed), 3)
    included = draw_included(include_key, num_canaries)
    data = _with_canaries(x_train, y_train, included)
    positions = torch.arange(num_canaries)

    def loss_fn(params, buffers, x, y, canary):
        logits = apply_fn(without_canary_parameter(params), buffers, x[None])
        real = (canary < 0).to(logits.dtype)
        direction = (positions == canary).to(logits.dtype) * max_norm
        return (
            real * F.cross_entropy(logits, y[None]) + (params[CANARY_PARAMETER] * direction).sum()
        )

    sigma = fdp.calibrate_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps
    )
    # A public constant: the expected batch size if half the canaries join, whoever joins.
    expected_batch = sample_rate * (len(x_train) + num_canaries / 2)
    privatizer = fdp.chain(
        fdp.clip(max_norm),
        fdp.aggregate(),
        fdp.gaussian_noise(sigma),
        fdp.normalize(expected_batch),
        fdp.account(sample_rate),
    )
    optimizer = fdp.optim.sgd(learning_rate)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=train_key
    )
    for batch in fdp.PoissonLoader(data, sample_rate, key=loader_key, steps=steps):
        state, _ = step(state, batch)
    scores = -state.params[CANARY_PARAMETER].detach().to(torch.float64) / learning_rate
    outcome = guess_from_scores(
        scores.numpy(), included.numpy(), delta=delta, confidence=confidence
    )
    with torch.no_grad():
        logits = apply_fn(without_canary_parameter(state.params), state.buffers, x_test)
    accuracy = float((logits.argmax(1) == y_test).float().mean())
    return TrainingAudit(
        fdp.epsilon(state.ledger, delta=delta),
        sigma,
        outcome.epsilon_lower_bound,
        outcome.num_guesses,
        outcome.num_correct,
        scores,
        included,
        accuracy,
    )


def _with_canaries(
    x: torch.Tensor, y: torch.Tensor, included: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training data plus one row per included canary (index >= 0; real rows have -1)."""
    members = included.nonzero().flatten()
    count = len(members)
    inputs = torch.cat([x, torch.zeros(count, x.shape[1], dtype=x.dtype)])
    labels = torch.cat([y, torch.zeros(count, dtype=y.dtype)])
    canary = torch.cat([torch.full((len(x),), -1, dtype=torch.long), members])
    return inputs, labels, canary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `funcdp audit` to `parser`."""
    parser.add_argument("--epsilon", type=float, default=4.0, help="target epsilon of the run")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--sample-rate",
        type=float,
        default=1.0,
        help="Poisson sampling rate; 1 (full batch) gives the strongest audit",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-canaries", type=int, default=1000)
    parser.add_argument("--max-norm", type=float, default=1.0, help="clipping norm C")
    parser.add_argument("--learning-rate", type=float, default=2.0)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Runs the audit and prints the accountant's epsilon beside the empirical lower bound.

    Returns:
      0 if the lower bound stays at or below the accountant's epsilon, 1 if it exceeds it
      (which proves the training code breaks its privacy guarantee).
    """
    result = audit_training(
        target_epsilon=args.epsilon,
        delta=args.delta,
        sample_rate=args.sample_rate,
        steps=args.steps,
        num_canaries=args.num_canaries,
        max_norm=args.max_norm,
        learning_rate=args.learning_rate,
        seed=args.seed,
        confidence=args.confidence,
    )
    m, delta, confidence = args.num_canaries, args.delta, args.confidence
    ceiling, _ = one_run_ceiling(m, delta=delta, confidence=confidence)
    rr_ceiling, _ = one_run_ceiling(m, delta=delta, confidence=confidence, epsilon=result.epsilon)
    print(
        f"DP-SGD on digits: q={args.sample_rate:g}, {args.steps} steps, sigma="
        f"{result.noise_multiplier:.4g}, C={args.max_norm:g}; test accuracy "
        f"{result.test_accuracy:.3f}"
    )
    print(f"accountant epsilon (delta={delta:g}):      {result.epsilon:.4f}")
    print(
        f"empirical lower bound ({confidence:.0%} conf.):  {result.epsilon_lower_bound:.4f}   "
        f"({result.num_correct} of {result.num_guesses} guesses right, {m} canaries, "
        f"{int(result.included.sum())} included)"
    )
    print(f"one-run ceiling, {m} canaries, all right: {ceiling:.4f}")
    print(f"one-run ceiling for an exactly {result.epsilon:.3g}-DP mechanism: {rr_ceiling:.4f}")
    if args.sample_rate == 1.0:
        mu = math.sqrt(args.steps) / result.noise_multiplier
        gaussian, _ = one_run_gaussian_ceiling(m, mu, delta=delta, confidence=confidence)
        print(f"one-run ceiling for this Gaussian mechanism (mu={mu:.3f}): {gaussian:.4f}")
    if result.epsilon_lower_bound > result.epsilon:
        print("AUDIT FAILED: the lower bound exceeds the accountant's epsilon")
        return 1
    print("audit passed: the lower bound does not exceed the accountant's epsilon")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m funcdp.audit.command [options]`, the same as `funcdp audit`."""
    parser = argparse.ArgumentParser(prog="funcdp audit", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

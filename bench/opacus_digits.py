"""`funcdp train`'s recipe through Opacus 1.6 and through funcdp, side by side, seeds 0, 1, 2.

Same data (scikit-learn's digits / 16, the fixed 80/20 split of `funcdp.datasets`), same model and
initialization (`funcdp.build_model` after `torch.manual_seed(seed)`), expected batch size,
epochs, clipping norm, SGD learning rate, (epsilon, delta), Poisson sampling and RDP accountant.

One difference cannot be removed through Opacus's public API: `make_private_with_epsilon` sets
the sample rate to 1 / len(data_loader) = 1 / ceil(n / batch_size) (here 1/6, an expected batch
of 239.5 rather than 256) and normalizes by int(n * q). So funcdp runs twice: with its own rate
q = batch_size / n (what `funcdp train` does) and with Opacus's rate, the like-for-like row.

Run: python bench/opacus_digits.py  (about a minute of CPU)
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from funcdp import datasets
from funcdp.recipe import Recipe, build_model, fit

SEEDS = (0, 1, 2)


def opacus_run(split: datasets.Split, recipe: Recipe, seed: int) -> tuple[float, float, float]:
    """Trains with Opacus; returns (test accuracy, epsilon, sample rate)."""
    torch.manual_seed(seed)
    model = build_model(split.num_features, split.num_classes, recipe.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr)
    loader = DataLoader(
        TensorDataset(split.x_train, split.y_train), batch_size=int(recipe.batch_size)
    )
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=recipe.epsilon,
        target_delta=recipe.delta,
        epochs=recipe.epochs,
        max_grad_norm=recipe.clip,
        poisson_sampling=True,
    )
    for _ in range(recipe.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            if len(y):
                F.cross_entropy(model(x), y).backward()
            optimizer.step()  # an empty batch still gets noise and is accounted
    model.eval()
    with torch.no_grad():
        accuracy = float((model(split.x_test).argmax(1) == split.y_test).float().mean())
    return accuracy, float(engine.get_epsilon(recipe.delta)), 1.0 / len(loader)


def funcdp_run(split: datasets.Split, recipe: Recipe, seed: int) -> tuple[float, float, float]:
    """Trains with funcdp (`funcdp.recipe.fit`); returns (test accuracy, epsilon, sample rate)."""
    result = fit(split, recipe, seed=seed)
    return result.test_accuracy, result.epsilon, recipe.batch_size / len(split.y_train)


def report(name: str, runs: list[tuple[float, float, float]], seconds: float) -> None:
    accuracies = [acc for acc, _, _ in runs]
    per_seed = " ".join(f"{acc:.3f}" for acc in accuracies)
    epsilons = " ".join(f"{eps:.3f}" for _, eps, _ in runs)
    print(
        f"{name:<28} q={runs[0][2]:.4f}  accuracy mean={np.mean(accuracies):.3f} "
        f"min={min(accuracies):.3f} [{per_seed}]  epsilon [{epsilons}]  "
        f"cpu/run={seconds / len(runs):.1f}s",
        flush=True,
    )


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("absl").setLevel(logging.ERROR)
    split = datasets.load_digits()
    recipe = Recipe()
    n = len(split.y_train)
    opacus_rate = 1.0 / math.ceil(n / recipe.batch_size)
    print(
        f"digits: {n} train / {len(split.y_test)} test; recipe: {recipe._asdict()}; "
        f"seeds {SEEDS}; torch threads {torch.get_num_threads()}"
    )
    rows = [
        ("opacus 1.6", opacus_run, recipe),
        ("funcdp, q = batch / n", funcdp_run, recipe),
        ("funcdp, q = Opacus's rate", funcdp_run, recipe._replace(batch_size=opacus_rate * n)),
    ]
    for name, run, row_recipe in rows:
        start = time.process_time()
        runs = [run(split, row_recipe, seed) for seed in SEEDS]
        report(name, runs, time.process_time() - start)


if __name__ == "__main__":
    main()

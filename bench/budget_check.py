"""What `fdp.budget` adds to a step: the default step on the MLP of the step benchmark with and
without a budget, in one process; median seconds per step and the ratio.

    python bench/budget_check.py [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import step_time
import torch
import zoo_models

import funcdp as fdp


def _times(with_budget: bool, steps: int) -> tuple[float, float]:
    """(first step, median of the rest) in seconds."""
    model, (x,), y = zoo_models.MODELS["mlp"]()
    parts = [fdp.clip(1.0), fdp.aggregate(), fdp.gaussian_noise(1.0), fdp.normalize(len(y))]
    parts.append(fdp.account(0.01))
    if with_budget:
        parts.append(fdp.budget(100.0, delta=1e-5))
    step, state = step_time.funcdp_train_step(model, fdp.chain(*parts), fdp.Performance())
    batch = fdp.Batch((x, y), torch.ones(len(y), dtype=torch.bool))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, _ = step(state, batch)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _times(False, 5)  # warm up
    first, plain = _times(False, args.steps)
    first_budget, budget = _times(True, args.steps)
    print(f"{'step':10s} {'first s':>8s} {'median s':>9s} {'vs none':>8s}")
    print(f"{'no budget':10s} {first:8.4f} {plain:9.4f} {1.0:8.3f}")
    print(f"{'budget':10s} {first_budget:8.4f} {budget:9.4f} {budget / plain:8.3f}")


if __name__ == "__main__":
    main()

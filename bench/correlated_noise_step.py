"""The default DP step with correlated noise (BLT, BandMF) against the same step with DP-SGD's
independent noise, on `bench/step_time.py`'s models, in one process, as ratios.

Both steps clip, sum, noise, normalize and update the same model on the same batch; only the
noise transform differs (`gaussian_noise` or `correlated_noise(sigma, strategy)`). Steps run
alternately in rounds, so the machine's drift falls on both alike; printed per model: median
seconds per step of each and the ratio, and the noise state's size in floats against the
parameters' count (a BLT with d buffers keeps d copies of the gradient).

    python bench/correlated_noise_step.py --models mlp transformer --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402

import funcdp as fdp  # noqa: E402

STEPS = 1000  # the strategies serve this many steps; the benchmark takes far fewer


def _noises() -> dict[str, fdp.GradientTransformation]:
    return {
        "gaussian": fdp.gaussian_noise(1.0),
        "blt-4": fdp.correlated_noise(1.0, fdp.mf.blt(STEPS, 4)),
        "bandmf-4": fdp.correlated_noise(1.0, fdp.mf.banded(STEPS, 4)),
    }


def _step(model, inputs, targets, noise):
    """A timed step closure and its state holder for one noise transform."""
    batch = targets.shape[0]
    privatizer = fdp.chain(fdp.clip(1.0), fdp.aggregate(), noise, fdp.normalize(batch))
    train_step, state = step_time.funcdp_train_step(model, privatizer, fdp.Performance())
    holder = [state]
    data = fdp.Batch((*inputs, targets), torch.ones(batch, dtype=torch.bool))

    def step():
        holder[0], _ = train_step(holder[0], data)

    return step, holder


def _state_floats(state) -> int:
    noise_states = [s for s in state.privacy_state if isinstance(s, fdp.CorrelatedNoiseState)]
    leaves = fdp.tree.tree_leaves(noise_states)
    return sum(x.numel() for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("model        noise      s/step   vs gaussian  noise-state floats / params")
    for name in args.models:
        module, inputs, targets = step_time.MODELS[name]()
        module = step_time._prepare(module, "funcdp")
        steps = {label: _step(module, inputs, targets, n) for label, n in _noises().items()}
        params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        times = {label: [] for label in steps}
        for step, _ in steps.values():
            step()  # warm-up: the ghost plan, kernels
        for _ in range(args.rounds):
            for label, (step, _) in steps.items():
                start = time.perf_counter()
                for _ in range(args.repeats):
                    step()
                times[label].append((time.perf_counter() - start) / args.repeats)
        base = statistics.median(times["gaussian"])
        for label, (_, holder) in steps.items():
            median = statistics.median(times[label])
            ratio = median / base
            floats = _state_floats(holder[0]) / params
            print(f"{name:12s} {label:9s} {median:8.4f}   {ratio:8.3f}     {floats:.1f}")


if __name__ == "__main__":
    main()

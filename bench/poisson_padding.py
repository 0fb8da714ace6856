"""What padding costs: the default step on real Poisson batches from `PoissonLoader` against the
same step on batches of exactly the realised size, in one process, as ratios.

A Poisson batch of expected size B is padded to a bucket (mean + 6 sd: 67 rows for B = 32) so
that shapes stay fixed. Timed per model, on the same sequence of sampled batches:

- `exact`: the real rows only (a shape per batch; the baseline);
- `bucket`: the padded batch in one piece (the default);
- `micro-M`: the padded batch in micro-batches of M rows (`Performance(microbatch_size=M)`),
  where a micro-batch of padding only is skipped, so padding costs at most one micro-batch.

    python bench/poisson_padding.py --models transformer mlp --steps 20 [--device cuda]
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

EXAMPLES = 4000  # a data set of this many rows, sampled at rate B / EXAMPLES


def _data(inputs, targets, count: int):
    """`count` rows drawn like the benchmark's batch (random tokens or features, labels)."""
    generator = torch.Generator().manual_seed(0)
    x = inputs[0]
    if x.dtype == torch.long:
        rows = torch.randint(0, int(x.max()) + 1, (count, *x.shape[1:]), generator=generator)
    else:
        rows = torch.randn((count, *x.shape[1:]), generator=generator)
    labels = torch.randint(0, int(targets.max()) + 1, (count,), generator=generator)
    return rows, labels


def _step(model, microbatch_size: int | None, expected: float, rate: float):
    privatizer = fdp.chain(
        fdp.clip(1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(1.0),
        fdp.normalize(expected),
        fdp.account(rate),
    )
    performance = fdp.Performance(microbatch_size=microbatch_size)
    return step_time.funcdp_train_step(model, privatizer, performance)


def _exact(batch: fdp.Batch) -> fdp.Batch:
    real = batch.mask
    rows = torch.ones(int(real.sum()), dtype=bool, device=real.device)
    return fdp.Batch(tuple(x[real] for x in batch.inputs), rows)


def _to(batch: fdp.Batch, device: str) -> fdp.Batch:
    return fdp.Batch(tuple(x.to(device) for x in batch.inputs), batch.mask.to(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["transformer", "mlp"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(f"# device={args.device}, torch {torch.__version__}")
    print("model        expected  bucket  way        s/step   vs exact")
    for name in args.models:
        module, inputs, targets = step_time.MODELS[name]()
        module = step_time._prepare(module, "funcdp").to(args.device)
        expected = float(targets.shape[0])
        rate = expected / EXAMPLES
        loader = fdp.PoissonLoader(
            _data(inputs, targets, EXAMPLES), rate, key=fdp.random.key(1), steps=args.steps
        )
        batches = [_to(batch, args.device) for batch in loader]
        ways = {"exact": None, "bucket": None, **{f"micro-{m}": m for m in args.micro}}
        steps = {way: _step(module, m, expected, rate) for way, m in ways.items()}
        times = {way: [] for way in ways}
        for index, batch in enumerate(batches):
            for way, (train_step, state) in steps.items():
                feed = _exact(batch) if way == "exact" else batch
                step_time._sync(args.device)
                start = time.perf_counter()
                train_step(state, feed)
                step_time._sync(args.device)
                if index:  # the first batch warms up (ghost plans, kernels)
                    times[way].append(time.perf_counter() - start)
        base = statistics.median(times["exact"])
        bucket = batches[0].mask.shape[0]
        for way, values in times.items():
            median = statistics.median(values)
            print(
                f"{name:12s} {expected:8.0f}  {bucket:6d}  {way:9s} {median:8.4f}  {median / base:8.3f}"
            )


if __name__ == "__main__":
    main()

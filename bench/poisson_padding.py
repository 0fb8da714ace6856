"""What padding costs: the default step on real Poisson batches from `PoissonLoader` against the
same step on batches of exactly the realised size, in one process, as ratios of mean step times.

A Poisson batch of expected size B is padded to a whole number of buckets (`PoissonLoader`'s
bucket is mean + 2 sd: 44 rows for B = 32); an eager step computes its real rows only where its
gradients are row-free (the MLP, CNN and transformer), else one bucket at a time (the LSTM). Timed
per model, on the same sequence of sampled batches:

- `exact`: batches cut to their real rows by hand (a shape per batch; the baseline);
- `padded`: the loader's padded batches, as they come (the default);
- `padded-6sd`: padded to mean + 6 sd (67 rows for B = 32), the index samplers' bucket;
- `micro-M`: the padded batches in micro-batches of M real rows
  (`Performance(microbatch_size=M)`).

Means, not medians: every step counts in what training costs. The count of batches larger than
the bucket (padded to two) is printed.

    python bench/poisson_padding.py --models transformer mlp cnn --steps 60 [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
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


def _batches(data, rate: float, steps: int, device: str, bucket_size: int | None = None):
    loader = fdp.PoissonLoader(
        data, rate, key=fdp.random.key(1), steps=steps, bucket_size=bucket_size
    )
    return [_to(batch, device) for batch in loader]


def _to(batch: fdp.Batch, device: str) -> fdp.Batch:
    inputs = tuple(x.to(device) for x in batch.inputs)
    return fdp.Batch(inputs, batch.mask.to(device), bucket_size=batch.bucket_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["transformer", "mlp", "cnn"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="funcdp.performance.keep_freed_memory() first (page faults off the timings)",
    )
    args = parser.parse_args()
    # The exact-size baseline computes a shape per batch on purpose; a step that keeps pieces of
    # one shape (its gradients not row-free: the LSTM) warns about that.
    warnings.filterwarnings("ignore", message="this step has computed batches in pieces")
    if args.keep_freed_memory:
        from funcdp.performance import keep_freed_memory

        keep_freed_memory()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(f"# device={args.device}, torch {torch.__version__}, mean of {args.steps - 1} steps")
    print("model        expected  bucket  way          s/step   vs exact")
    for name in args.models:
        module, inputs, targets = step_time.MODELS[name]()
        module = step_time._prepare(module, "funcdp").to(args.device)
        expected = float(targets.shape[0])
        rate = expected / EXAMPLES
        data = _data(inputs, targets, EXAMPLES)

        default = _batches(data, rate, args.steps, args.device)
        sd = math.sqrt(expected * (1 - rate))
        old_bucket = math.ceil(expected + 6 * sd + 1)
        ways = {
            "exact": ([_exact(batch) for batch in default], None),
            "padded": (default, None),
            "padded-6sd": (_batches(data, rate, args.steps, args.device, old_bucket), None),
            **{f"micro-{m}": (default, m) for m in args.micro},
        }
        steps = {way: _step(module, m, expected, rate) for way, (_, m) in ways.items()}
        totals = dict.fromkeys(ways, 0.0)
        for index in range(args.steps):
            for way, (train_step, state) in steps.items():
                feed = ways[way][0][index]
                step_time._sync(args.device)
                start = time.perf_counter()
                train_step(state, feed)
                step_time._sync(args.device)
                if index:  # the first batch warms up (ghost plans, kernels)
                    totals[way] += time.perf_counter() - start
        bucket = default[0].bucket_size
        for way, total in totals.items():
            mean = total / (args.steps - 1)
            ratio = total / totals["exact"]
            print(f"{name:12s} {expected:8.0f}  {bucket:6d}  {way:11s} {mean:8.4f}  {ratio:8.3f}")
        over = sum(len(batch.mask) > bucket for batch in default[1:])
        print(f"# {name}: {over} of {args.steps - 1} batches larger than the bucket of {bucket}")


if __name__ == "__main__":
    main()

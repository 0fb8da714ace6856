"""Step time of one logical Poisson batch on 1 and on 2 processes (torch.distributed, gloo).

Each world size runs in fresh processes; rank 0 reports the median wall time of a DP step
(per-example gradients of its shard, clipping, one all-reduce, noise, SGD). The data, key and
logical batch are the same for every world size, so the ideal is a time halved by two ranks.

    python bench/distributed_scaling.py [--threads 1] [--batch 512] [--steps 20]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import funcdp as fdp


def _worker(rank, world, init_file, args, out):
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.manual_seed(0)
    n = 20 * args.batch
    x, y = torch.randn(n, 64), torch.randint(0, 10, (n,))
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    q = args.batch / n
    privatizer = fdp.chain(
        fdp.clip(1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(1.0),
        fdp.normalize(args.batch),
        fdp.account(q),
    )
    optimizer = fdp.optim.sgd(0.1)
    group = dist.group.WORLD if world > 1 else None
    step = fdp.make_train_step(loss_fn, privatizer, optimizer, process_group=group)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    times = []
    loader = fdp.PoissonLoader(
        (x, y), q, key=fdp.random.key(1), steps=args.steps, rank=rank, world_size=world
    )
    for batch in loader:
        start = time.perf_counter()
        state, _ = step(state, batch)
        times.append(time.perf_counter() - start)
    if rank == 0:
        out[world] = statistics.median(times[3:])
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--batch", type=int, default=512, help="expected logical batch size")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    results = mp.Manager().dict()
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(
                _worker,
                args=(world, os.path.join(tmp, "init"), args, results),
                nprocs=world,
                start_method="spawn",
            )
    print(
        f"# torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s) per "
        f"process, MLP 64-256-256-10, expected logical batch {args.batch}"
    )
    for world in (1, 2):
        print(
            f"processes={world}  s/step={results[world]:.4f}  "
            f"speed-up={results[1] / results[world]:.2f}x"
        )


if __name__ == "__main__":
    main()

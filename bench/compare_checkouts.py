"""The default DP step of two checkouts of funcdp, side by side: did a change cost speed?

Each round runs every model's default step (`bench/step_time.py`'s `funcdp` engine) once per
checkout, each in its own process with that checkout first on the path, alternating, so that the
machine's drift falls on both alike. Printed per model: the median over rounds of each
checkout's median step time, and their ratio (new / old).

    git worktree add /tmp/before HEAD~3
    python bench/compare_checkouts.py /tmp/before . --rounds 4 --models mlp transformer

On a CPU a step's page faults (glibc returning freed memory to the system) vary from process to
process by tens of percent of the step; `--keep-freed-memory` sets glibc's malloc, through its
environment variables, to keep freed memory in every worker (as
`funcdp.performance.keep_freed_memory` does, which an old checkout may lack).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _worker(root: str, model: str, repeats: int, warmup: int) -> None:
    sys.path[:0] = [str(Path(root) / "bench"), root]
    import step_time
    import torch

    torch.set_num_threads(1)
    module, inputs, targets = step_time.MODELS[model]()
    step = step_time._funcdp_step(step_time._prepare(module, "funcdp"), inputs, targets)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"median": statistics.median(times)}))


# glibc's malloc tunables, as funcdp.performance.keep_freed_memory sets them
_KEEP_FREED = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(1 << 28),
}


def _run(root: str, model: str, repeats: int, warmup: int, keep: bool) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(root), **(_KEEP_FREED if keep else {})}
    command = [sys.executable, __file__, "--worker", os.path.abspath(root), model]
    command += ["--repeats", str(repeats), "--warmup", str(warmup)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", nargs="?", help="the checkout before the change")
    parser.add_argument("new", nargs="?", help="the checkout after it")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "lstm", "transformer"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="keep freed memory in every worker"
    )
    parser.add_argument("--worker", nargs=2, metavar=("ROOT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker, args.repeats, args.warmup)
        return
    kept = ", freed memory kept" if args.keep_freed_memory else ""
    print(f"# old {args.old}, new {args.new}, {args.rounds} rounds, one thread{kept}")
    print(f"{'model':12s} {'old s/step':>11s} {'new s/step':>11s} {'new/old':>8s}   rounds")
    for model in args.models:
        old, new = [], []
        for _ in range(args.rounds):
            old.append(_run(args.old, model, args.repeats, args.warmup, args.keep_freed_memory))
            new.append(_run(args.new, model, args.repeats, args.warmup, args.keep_freed_memory))
        a, b = statistics.median(old), statistics.median(new)
        rounds = " ".join(f"{x / y:.3f}" for x, y in zip(new, old, strict=True))
        print(f"{model:12s} {a:11.4f} {b:11.4f} {b / a:8.3f}   {rounds}", flush=True)


if __name__ == "__main__":
    main()

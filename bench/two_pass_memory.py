"""Peak memory of `clipped_sum` in "vmap" and "two_pass" modes: a 1M-parameter MLP, batch 256.

Each mode runs in a fresh subprocess. On the CPU the figure is the rise of the process's peak
resident set size (ru_maxrss) during one call, after a warm-up call on two examples; on CUDA it is
`torch.cuda.max_memory_allocated` during the call, less the memory allocated before it. The two
results are also compared (they must agree to 1e-5).

    python bench/two_pass_memory.py [--device cpu|cuda] [--batch 256] [--chunk 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import funcdp as fdp
from funcdp import clipped_sum


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 784*1024 + 1024 + 1024*216 + 216 + 216*10 + 10 = 1,027,410 parameters.
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 216), nn.ReLU(), nn.Linear(216, 10)
    )


def _measure(mode: str, device: str, batch: int, chunk: int) -> dict:
    module = _model().to(device)
    apply_fn, params, buffers = fdp.functionalize(module)

    def loss_fn(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x[None]), y[None])

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 784, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    fn = clipped_sum(
        loss_fn, max_norm=1.0, mode=mode, chunk_size=chunk if mode == "two_pass" else None
    )
    fn(params, buffers, x[:2], y[:2])  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summed = fn(params, buffers, x, y).grads
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    torch.save({k: v.cpu() for k, v in summed.items()}, f"/tmp/two_pass_{mode}_{device}.pt")
    count = sum(p.numel() for p in params.values())
    return {"mode": mode, "params": count, "batch": batch, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--worker", choices=("vmap", "two_pass"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure(args.worker, args.device, args.batch, args.chunk)))
        return
    results = {}
    for mode in ("vmap", "two_pass"):
        command = [
            sys.executable,
            __file__,
            "--worker",
            mode,
            "--device",
            args.device,
            "--batch",
            str(args.batch),
            "--chunk",
            str(args.chunk),
        ]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        print(
            f"{mode:9s} params={results[mode]['params']:,} batch={args.batch} "
            f"peak={results[mode]['peak_bytes'] / 2**20:,.1f} MiB"
        )
    a = torch.load(f"/tmp/two_pass_vmap_{args.device}.pt")
    b = torch.load(f"/tmp/two_pass_two_pass_{args.device}.pt")
    error = max(float((a[k] - b[k]).abs().max()) for k in a)
    ratio = results["two_pass"]["peak_bytes"] / results["vmap"]["peak_bytes"]
    print(f"max |vmap - two_pass| = {error:.2e}; peak ratio two_pass / vmap = {ratio:.3f}")


if __name__ == "__main__":
    main()

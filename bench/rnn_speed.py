"""Per-example gradients of LSTM/GRU on CPU: funcdp.nn vs vmap over torch.nn vs Opacus hooks.

    python bench/rnn_speed.py [--batch 64] [--steps 64] [--hidden 128] [--repeats 5] [--threads N]
                              [--device cpu]

Every configuration computes the per-example gradients of `sum(out[:, -1] ** 2)` for a batch of
sequences (one layer, batch_first), and is timed `--repeats` times after one warm-up run; the
table gives the median CPU time (user + system of this process) and median wall time. Ratios
are against funcdp's layer; CPU time is the fairer figure on a shared machine.

- funcdp: `vmap(grad(loss))` over `funcdp.nn.LSTM` / `GRU`;
- torch vmap: `vmap(grad(loss))` over `torch.nn.LSTM` (falls back to a per-example loop; over
  `torch.nn.GRU` it fails, so the GRU row is a plain per-example autograd loop instead);
- Opacus: `DPLSTM` / `DPGRU` wrapped in `GradSampleModule` (hooks), one backward per batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import funcdp.nn as fnn


def _per_example_vmap(module: nn.Module) -> Callable[[torch.Tensor], object]:
    params = {n: p.detach() for n, p in module.named_parameters()}

    def loss(params, x):
        out, _ = functional_call(module, params, (x[None],))
        return out[:, -1].pow(2).sum()

    fn = vmap(grad(loss), in_dims=(None, 0))
    return lambda x: fn(params, x)


def _per_example_loop(module: nn.Module) -> Callable[[torch.Tensor], object]:
    params = list(module.parameters())

    def run(x):
        grads = []
        for i in range(x.shape[0]):
            out, _ = module(x[i : i + 1])
            grads.append(torch.autograd.grad(out[:, -1].pow(2).sum(), params))
        return [torch.stack(g) for g in zip(*grads, strict=True)]

    return run


def _opacus(
    kind: str, size: int, hidden: int, device: str
) -> Callable[[torch.Tensor], object] | None:
    try:
        from opacus.grad_sample import GradSampleModule
        from opacus.layers import DPGRU, DPLSTM
    except ImportError:
        return None
    layer = (DPLSTM if kind == "LSTM" else DPGRU)(size, hidden, batch_first=True).to(device)
    model = GradSampleModule(layer, batch_first=True, loss_reduction="sum")

    def run(x):
        model.zero_grad(set_to_none=True)
        out, _ = model(x)
        out[:, -1].pow(2).sum().backward()
        return [p.grad_sample for p in model.parameters()]

    return run


def _time(
    fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int
) -> tuple[float, float]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    fn(x)  # warm-up
    sync()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn(x)
        sync()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--input", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*performance drop.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.steps, args.input, device=args.device)
    print(f"batch {args.batch}, sequence {args.steps}, input {args.input}, hidden {args.hidden}, "
          f"{torch.get_num_threads()} threads, {args.device}, median of {args.repeats}")  # fmt: skip
    print(f"{'layer':5} {'configuration':32} {'cpu s':>8} {'wall s':>8} {'cpu x':>7} {'wall x':>7}")
    for kind in ("LSTM", "GRU"):
        reference = getattr(nn, kind)(args.input, args.hidden, batch_first=True).to(args.device)
        ours = getattr(fnn, kind).from_torch(reference)
        runs = [("funcdp.nn (vmap)", _per_example_vmap(ours))]
        if kind == "LSTM":
            runs.append(("torch.nn.LSTM (vmap, fallback)", _per_example_vmap(reference)))
        else:
            runs.append(("torch.nn.GRU (per-example loop)", _per_example_loop(reference)))
        opacus = _opacus(kind, args.input, args.hidden, args.device)
        if opacus is not None:
            runs.append((f"opacus DP{kind} (GradSampleModule)", opacus))
        base = None
        for name, fn in runs:
            cpu, wall = _time(fn, x, args.repeats)
            base = base or (cpu, wall)
            print(
                f"{kind:5} {name:32} {cpu:8.3f} {wall:8.3f} {cpu / base[0]:7.1f} {wall / base[1]:7.1f}"
            )


if __name__ == "__main__":
    main()

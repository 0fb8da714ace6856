"""How many ops one warm step dispatches, per engine, against the non-private step: the cost on
a GPU at small sizes, counted on any machine.

On a GPU a small model's step is bound by the host: each kernel finishes before the next is
issued, so the step costs about its count of dispatched ops times 10-25 microseconds (on an
H200, bench/RESULTS.md), whatever the arithmetic. This counts, under a `TorchDispatchMode`, the
aten ops of one step after two warm-up steps: all of them, the ones that launch a kernel on a
GPU (not views, not bare allocations), and host syncs (a value read back: `.item()`, `bool()`;
`.tolist()` does not dispatch an op, so its reads, such as the certified squares' range check,
are not counted).

    python bench/op_count.py                        # the zoo, non-private, funcdp, Opacus
    python bench/op_count.py --models mlp --engines nonprivate funcdp funcdp-vmap
"""

from __future__ import annotations

import argparse
import collections

import step_time
import torch
from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {"empty", "empty_strided", "empty_like", "_local_scalar_dense"}
ENGINES = ["nonprivate", "funcdp", "funcdp-vmap", "opacus-hooks", "opacus-ghost"]


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            kind = "sync"
        elif func.is_view or name in NO_KERNEL:
            kind = "other"
        else:
            kind = "kernel"
        self.ops[kind] += 1
        return func(*args, **(kwargs or {}))


def count(model_name: str, engine: str) -> collections.Counter:
    """Ops of one warm step of `engine` on `model_name` (the step benchmark's builders, CPU)."""
    step = step_time.prepare(model_name, engine, "cpu")()
    for _ in range(2):  # plans, probes and chunk sizes are settled in the first steps
        step()
    with _Count() as counter:
        step()
    return counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    every = list(step_time.MODELS) + list(step_time.HF_MODELS)
    parser.add_argument("--models", nargs="+", default=list(step_time.MODELS), choices=every)
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=step_time.ENGINES)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}; one warm step; ratio: kernels over the non-private step's")
    print(f"{'model':<14} {'engine':<16} {'ops':>6} {'kernels':>8} {'syncs':>6} {'x nonpriv':>10}")
    for model_name in args.models:
        base = None
        for engine in args.engines:
            try:
                ops = count(model_name, engine)
            except Exception as error:  # noqa: BLE001 - the row says why
                print(f"{model_name:<14} {engine:<16} failed: {step_time.failure(error)}")
                continue
            if engine == "nonprivate":
                base = ops["kernel"]
            ratio = f"{ops['kernel'] / base:.2f}" if base else "-"
            print(
                f"{model_name:<14} {engine:<16} {sum(ops.values()):>6} {ops['kernel']:>8} "
                f"{ops['sync']:>6} {ratio:>10}",
                flush=True,
            )


if __name__ == "__main__":
    main()

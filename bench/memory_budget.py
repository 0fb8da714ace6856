"""The largest batch whose step fits a memory budget: non-private, funcdp's default, Opacus ghost.

For each model and engine the batch doubles from --start until a step's peak memory exceeds the
budget (or the step runs out of memory), then bisection between the last batch that fit and the
first that did not narrows it to --tolerance (relative). Each try runs in its own process: it
builds the model and a batch of that size (`step_time.prepare`: the step benchmark's models and
engines), builds the engine's step and runs --steps steps (the first includes funcdp's probe).

Peak memory of a try: what the model, its batch, the engine's state and the step hold at their
peak, the libraries' own memory excluded. CUDA: `torch.cuda.max_memory_allocated()`. CPU: the
process's peak resident set (VmHWM, whose peak is reset through /proc/self/clear_refs once the
libraries are imported) less the resident set at that moment. Unlike `step_time.py`'s growth of
ru_maxrss it counts the model's weights and cannot be hidden by an earlier, higher peak. On the
CPU a watchdog thread ends a try as soon as its resident growth passes the budget (it cannot fit).

    python bench/memory_budget.py --budget-mb 2048 --threads 1
    python bench/memory_budget.py --models transformer --engines nonprivate funcdp --budget-mb 512
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

import step_time
import torch

ENGINES = ["nonprivate", "funcdp", "opacus-ghost"]
MODELS = ["transformer", "gpt2-lora-128", "gpt2-128"]
OVER_BUDGET = 3  # a try's exit status when the watchdog stopped it


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M).group(1))


def _watch(limit_kb: int, base_kb: int) -> None:
    """Ends the process (status OVER_BUDGET) once its resident set grows past `limit_kb`."""
    while True:
        if _status_kb("VmRSS") - base_kb > limit_kb:
            print(json.dumps({"over_budget": True}), flush=True)
            os._exit(OVER_BUDGET)
        time.sleep(0.005)


def try_batch(model: str, engine: str, batch: int, *, device: str, steps: int, budget_mb: float):
    """One try in this process: the peak memory (MB) of `steps` steps at `batch` rows."""
    import funcdp.hf  # noqa: F401 - the engine's libraries before the baseline

    if engine.startswith("opacus"):
        import opacus  # noqa: F401
    if model in step_time.HF_MODELS:
        import peft  # noqa: F401
        import transformers  # noqa: F401

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current resident set
        base_kb = _status_kb("VmRSS")
        watchdog = (int(budget_mb * 1024), base_kb)
        threading.Thread(target=_watch, args=watchdog, daemon=True).start()
    step = step_time.prepare(model, engine, device, batch)()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return (_status_kb("VmHWM") - base_kb) / 1024


def _try(model: str, engine: str, batch: int, args) -> dict:
    """A try in a fresh process: {"peak_mb"}, {"over_budget"} or {"error"} (its first line)."""
    command = [sys.executable, __file__, "--one", model, engine, str(batch)]
    command += ["--device", args.device, "--steps", str(args.steps)]
    command += ["--budget-mb", str(args.budget_mb), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        return json.loads(lines[-1])
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return {"over_budget": True} if done.returncode < 0 else {"error": last}  # < 0: killed


def _fits(record: dict, budget_mb: float) -> bool:
    return "peak_mb" in record and record["peak_mb"] <= budget_mb


def largest_batch(model: str, engine: str, args) -> tuple[int, float] | str:
    """The largest batch that fits and its peak MB, or why the engine fails on this model."""
    tries: dict[int, dict] = {}

    def fits(batch: int) -> bool:
        tries[batch] = record = _try(model, engine, batch, args)
        shown = f"{record['peak_mb']:.1f} MB" if "peak_mb" in record else "over budget"
        print(f"#   {model} {engine} batch {batch}: {record.get('error', shown)}", flush=True)
        if "error" in record and not _out_of_memory(record["error"]):
            raise _Failed(record["error"])
        return _fits(record, args.budget_mb)

    try:
        if not fits(args.start):
            return f"batch {args.start} does not fit"
        low, high = args.start, 2 * args.start
        while high <= args.max_batch and fits(high):
            low, high = high, 2 * high
        if high > args.max_batch:
            return low, tries[low]["peak_mb"]
        while high - low > max(1, int(low * args.tolerance)):
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
    except _Failed as failure:
        return f"failed: {failure}"
    return low, tries[low]["peak_mb"]


class _Failed(Exception):
    """An engine's error other than running out of memory."""


def _out_of_memory(message: str) -> bool:
    return "OutOfMemoryError" in message or "can't allocate memory" in message


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    every = list(step_time.MODELS) + list(step_time.HF_MODELS)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=every)
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=step_time.ENGINES)
    parser.add_argument("--budget-mb", type=float, default=2048.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--start", type=int, default=8, help="the first batch tried")
    parser.add_argument("--max-batch", type=int, default=4096, help="stop doubling above this")
    parser.add_argument("--tolerance", type=float, default=0.1, help="bisect to this fraction")
    parser.add_argument("--steps", type=int, default=2, help="steps per try")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per try")
    parser.add_argument(
        "--one", nargs=3, metavar=("MODEL", "ENGINE", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        model, engine, batch = args.one
        options = {"device": args.device, "steps": args.steps, "budget_mb": args.budget_mb}
        try:
            record = {"peak_mb": try_batch(model, engine, int(batch), **options)}
        except Exception as error:  # noqa: BLE001 - the parent reads it
            record = {"error": step_time.failure(error)}
        print(json.dumps(record), flush=True)
        return
    print(f"# budget {args.budget_mb:g} MB on {args.device}, torch {torch.__version__}")
    print(f"# {' '.join(sys.argv)}")
    rows = []
    for model in args.models:
        results = {engine: largest_batch(model, engine, args) for engine in args.engines}
        base = results.get("nonprivate")
        for engine, result in results.items():
            if isinstance(result, str):
                rows.append(f"{model:<14} {engine:<14} {result}")
                continue
            ratio = f"{result[0] / base[0]:.2f}" if isinstance(base, tuple) else "-"
            rows.append(f"{model:<14} {engine:<14} {result[0]:>8} {result[1]:>9.1f} {ratio:>9}")
    print(f"{'model':<14} {'engine':<14} {'batch':>8} {'peak MB':>9} {'x nonpriv':>9}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

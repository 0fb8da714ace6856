"""Time one full DP-SGD step of funcdp, Opacus and non-private PyTorch, side by side.

A step is: per-example gradients, clipping at C=1, Gaussian noise with sigma=1, an SGD update.
Each (model, engine) pair runs in its own subprocess so that peak memory is its own. Printed per
model: median seconds per step, the ratio to the non-private step of the same run, and peak memory
(CUDA: max allocated; CPU: growth of the process's max resident set after the model is built
and the engine's library imported).

    python bench/step_time.py                     # all models and engines, on CUDA if available
    python bench/step_time.py --models mlp cnn --engines nonprivate funcdp opacus-hooks
    python bench/step_time.py --rounds 3          # each engine 3 times, round-robin; medians
    python bench/step_time.py --models gpt2-128 gpt2-lora-512 --batch 8 --warmup 1 --repeats 3
    python bench/step_time.py --device cuda --in-process   # a lent GPU: no process start per run
    python bench/step_time.py --device cpu --keep-freed-memory   # every engine, glibc malloc kept

Models: the zoo of `zoo_models.py` (MLP, CNN, LSTM, transformer encoder, ResNet-18) and Hugging
Face models from `hf_models.py` at sequence 128 or 512 (`gpt2-*`: a GPT-2 causal LM fully
fine-tuned; `gpt2-lora-*`: with LoRA adapters, only they trainable; `bert-*`: a classifier),
HF's default attention, padded batches with a 2-D mask, their steps from `hf_step.py`. An engine
that fails on a model gets a row with its error's first line.

On a shared machine one run's figures can be off by tens of percent; with --rounds the engines
of a model take turns, each row gives the median over rounds, the ratio is the median of each
round's ratio to that round's non-private step, and the rounds' own figures are listed.

`funcdp` is `make_train_step` with its defaults (`fdp.Performance()`: mode "auto", which is
ghost clipping here: no per-example gradients for linear, conv, embedding and normalization
layers); `funcdp-vmap` is `performance=fdp.Performance(mode="vmap")` (every example's gradient
formed). `funcdp-compiled` and `funcdp-vmap-compiled` are the same two steps with
`compile=True` in their `Performance`; the first step runs eagerly and the second compiles, and
the time of those two steps less two median steps is printed as the compile time.

On a CPU much of a step's time can be page faults: glibc returns large freed blocks to the
system, and the next step faults them in again. `--keep-freed-memory` runs
`funcdp.performance.keep_freed_memory()` at the start of every engine's run (non-private and
Opacus too), so that the figures show the arithmetic rather than the allocator.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import hf_step
import torch
import torch.nn.functional as F
import zoo_models
from torch import nn

ENGINES = [
    "nonprivate",
    "funcdp",
    "funcdp-vmap",
    "funcdp-compiled",
    "funcdp-vmap-compiled",
    "opacus-hooks",
    "opacus-functorch",
    "opacus-ghost",
]


MODELS = zoo_models.MODELS
# Hugging Face models (`hf_models.py`: built from configs, HF's default attention, padded batches
# with a 2-D mask): name -> (hf_models name, sequence length); their steps are `hf_step.STEPS`.
HF_MODELS = {
    f"{name}-{seq}": (name, seq) for name in ("gpt2", "gpt2-lora", "bert") for seq in (128, 512)
}
HF_BATCH = 8


def _prepare(model, engine):
    """The engine's version of the model: funcdp's runs through `funcdp.fix` (its drop-in LSTM
    and attention), Opacus's gets its DPLSTM here (weights are not kept) and
    `ModuleValidator.fix` when the engine is built."""
    if engine.startswith("funcdp"):
        import funcdp

        return funcdp.fix(model)
    if isinstance(model, zoo_models.TextLSTM) and engine.startswith("opacus"):
        from opacus.layers import DPLSTM

        rnn = model.rnn
        model.rnn = DPLSTM(rnn.input_size, rnn.hidden_size, batch_first=True)
    return model


def _nonprivate_step(model, inputs, targets):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(*inputs), targets).backward()
        optimizer.step()

    return step


def _funcdp_step(model, inputs, targets, compile=False, mode="auto"):
    import funcdp as fdp

    batch = inputs[0].shape[0]
    privatizer = fdp.chain(
        fdp.clip(1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(1.0),
        fdp.normalize(batch),
        fdp.account(0.01),
    )
    performance = fdp.Performance(mode=mode, compile=compile)
    train_step, state = funcdp_train_step(model, privatizer, performance)
    holder = [state]
    data = fdp.Batch((*inputs, targets), torch.ones(batch, dtype=torch.bool, device=targets.device))

    def step():
        holder[0], _ = train_step(holder[0], data)

    return step


def funcdp_train_step(model, privatizer, performance):
    """funcdp's step on `model`'s cross-entropy (one input, one label per example), SGD at 0.1,
    and the state before its first step (key 0); the other benchmarks build theirs here too."""
    import funcdp as fdp

    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    optimizer = fdp.optim.sgd(0.1)
    train_step = fdp.make_train_step(loss_fn, privatizer, optimizer, performance=performance)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    return train_step, state


def _opacus_step(mode):
    def build(model, inputs, targets):
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

        # Opacus needs its own attention layer (DPMultiheadAttention) in place of torch's.
        model = ModuleValidator.fix(model)
        dataset = torch.utils.data.TensorDataset(*(t.cpu() for t in inputs), targets.cpu())
        loader = torch.utils.data.DataLoader(dataset, batch_size=len(targets))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = PrivacyEngine()
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            criterion=nn.CrossEntropyLoss(),
        )
        private_model, private_optimizer = made[0], made[1]
        criterion = made[2] if mode == "ghost" else nn.CrossEntropyLoss()

        def step():
            private_optimizer.zero_grad(set_to_none=True)
            criterion(private_model(*inputs), targets).backward()
            private_optimizer.step()

        return step

    return build


BUILDERS = {
    "nonprivate": _nonprivate_step,
    "funcdp": _funcdp_step,
    "funcdp-vmap": lambda *args: _funcdp_step(*args, mode="vmap"),
    "funcdp-compiled": lambda *args: _funcdp_step(*args, compile=True),
    "funcdp-vmap-compiled": lambda *args: _funcdp_step(*args, mode="vmap", compile=True),
    "opacus-hooks": _opacus_step("hooks"),
    "opacus-functorch": _opacus_step("functorch"),
    "opacus-ghost": _opacus_step("ghost"),
}


def prepare(model_name: str, engine: str, device: str, batch: int | None = None):
    """Builds the model and its batch on `device` (`batch` rows, or the model's default) and
    returns a function that builds `engine`'s step on them, so that the caller can tell the
    model's memory from the step's."""
    torch.manual_seed(0)
    if model_name in HF_MODELS:
        name, seq = HF_MODELS[model_name]
        case = hf_step.build_case(name, seq=seq, batch_size=batch or HF_BATCH, device=device)
        return lambda: hf_step.STEPS[engine](*case)
    model, inputs, targets = MODELS[model_name](*([batch] if batch else []))
    model, inputs, targets = (
        _prepare(model, engine).to(device),
        tuple(x.to(device) for x in inputs),
        targets.to(device),
    )
    return lambda: BUILDERS[engine](model, inputs, targets)


def run_one(
    model_name: str, engine: str, device: str, warmup: int, repeats: int, batch: int | None = None
) -> dict:
    """Times one engine on one model in this process; returns a JSON-able record."""
    build = prepare(model_name, engine, device, batch)
    _import_library(engine)  # the library's code is not the step's memory
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = build()
    _sync(device)
    start = time.perf_counter()
    for _ in range(2):  # a compiled step runs eagerly first, then compiles
        step()
    _sync(device)
    first = time.perf_counter() - start
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    seconds = statistics.median(times)
    return {
        "model": model_name,
        "engine": engine,
        "seconds": seconds,
        "peak_mb": peak_mb,
        "compile_s": first - 2 * seconds if engine.endswith("compiled") else None,
    }


def _import_library(engine: str) -> None:
    if engine.startswith("funcdp"):
        import funcdp  # noqa: F401
    elif engine.startswith("opacus"):
        import opacus  # noqa: F401


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    every = list(MODELS) + list(HF_MODELS)
    parser.add_argument("--models", nargs="+", default=every, choices=every)
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"rows per step (default: the model's; HF {HF_BATCH})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in each run (default: torch's)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds allowed to each (model, engine)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every engine this many times, round-robin; report medians over the rounds",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="CUDA only: run every (model, engine) in this process (peak memory is reset per "
        "run), which saves a process start per run on a lent GPU machine",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="every run keeps freed memory for reuse (glibc malloc; see the docstring)",
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process and args.device != "cuda":
        parser.error("--in-process needs --device cuda (CPU peaks are the process's own)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from funcdp.performance import keep_freed_memory

        if not keep_freed_memory():
            parser.error("--keep-freed-memory needs glibc's malloc")
    if args.one:
        try:
            record = run_one(*args.one, args.device, args.warmup, args.repeats, args.batch)
        except Exception as error:  # noqa: BLE001 - the parent prints it in the engine's row
            record = {"error": failure(error)}
        print(json.dumps(record))
        return
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, device={args.device}"
        f"{' ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"# {' '.join(sys.argv)}")
    print(
        f"{'model':<14} {'engine':<20} {'s/step':>9} {'x nonpriv':>10} {'peak MB':>9} "
        f"{'compile s':>10}" + ("   s/step over rounds" if args.rounds > 1 else "")
    )
    for model_name in args.models:
        runs: dict[str, list[dict]] = {engine: [] for engine in args.engines}
        failures: dict[str, str] = {}
        for _ in range(args.rounds):  # round-robin, so that a slow spell hits every engine
            for engine in args.engines:
                if engine in failures:
                    continue
                record = (_run_here if args.in_process else _run_in_subprocess)(
                    model_name, engine, args
                )
                if isinstance(record, str):
                    failures[engine] = record
                else:
                    runs[engine].append(record)
        for engine in args.engines:
            if engine in failures:
                print(f"{model_name:<14} {engine:<20} failed: {failures[engine]}")
            else:
                print(_row(model_name, engine, runs[engine], runs.get("nonprivate")), flush=True)


def _run_here(model_name: str, engine: str, args) -> dict | str:
    """One (model, engine) run in this process, after the last run's memory is freed."""
    gc.collect()
    torch.cuda.empty_cache()
    try:
        return run_one(model_name, engine, args.device, args.warmup, args.repeats, args.batch)
    except Exception as error:  # noqa: BLE001 - the engine's row says why
        return failure(error)


def _run_in_subprocess(model_name: str, engine: str, args) -> dict | str:
    """One (model, engine) run in a fresh process: its record, or why it failed."""
    command = [sys.executable, __file__, "--one", model_name, engine, "--device", args.device]
    command += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    command += [] if args.threads is None else ["--threads", str(args.threads)]
    command += [] if args.batch is None else ["--batch", str(args.batch)]
    command += ["--keep-freed-memory"] if args.keep_freed_memory else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"over {args.timeout:g} s"
    if done.returncode != 0:  # killed (out of memory?) or crashed outside the step
        return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return record.get("error", record)


def failure(error: BaseException) -> str:
    """An exception's type and the first line of its message (a failed engine's row shows it)."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def _row(model_name: str, engine: str, records: list[dict], baselines: list[dict] | None) -> str:
    """Medians over rounds; the ratio is the median of each round's ratio to its own baseline."""
    seconds = statistics.median(r["seconds"] for r in records)
    ratio = "-"
    if baselines:
        pairs = zip(records, baselines, strict=False)
        ratio = f"{statistics.median(r['seconds'] / b['seconds'] for r, b in pairs):.2f}"
    peak = statistics.median(r["peak_mb"] for r in records)
    compiled = [r["compile_s"] for r in records if r["compile_s"] is not None]
    compile_s = f"{statistics.median(compiled):.1f}" if compiled else ""
    spread = ""
    if len(records) > 1:
        spread = "   " + " ".join(f"{r['seconds']:.4f}" for r in records)
    return (
        f"{model_name:<14} {engine:<20} {seconds:>9.4f} {ratio:>10} {peak:>9.1f} "
        f"{compile_s:>10}{spread}"
    )


if __name__ == "__main__":
    main()

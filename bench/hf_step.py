"""Time one DP-SGD step on Hugging Face models with HF's default attention, beside non-private.

Models (`hf_models.py`, built from configs): GPT-2 with LoRA adapters (peft), GPT-2 fully
fine-tuned, and a BERT classifier, each on a padded batch with a 2-D attention mask. Engines:
`nonprivate` (one backward of the batch's mean loss, an SGD update), `funcdp` (make_train_step's
defaults: ghost clipping where it applies), `funcdp-vmap` (every example's gradient formed),
`opacus-hooks` (Opacus's GradSampleModule and DPOptimizer) and `opacus-ghost` (Opacus's ghost
clipping: GradSampleModuleFastGradientClipping, two backward passes). Every engine clips at 1,
adds noise of sigma 1 (the private ones) and takes an SGD step. Printed: median seconds per step
and the ratio to the non-private step. `step_time.py` times these same steps (its `gpt2-*`
models), each engine in its own process and in rounds.

    python bench/hf_step.py --models gpt2-lora bert --seq 128 512 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import hf_models
import torch

LEARNING_RATE = 0.01


def nonprivate(model, kind, batch):
    """One step of the batch's mean loss (per-example losses averaged), plain SGD."""
    ids, mask, labels = batch
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], LEARNING_RATE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
        hf_models.example_losses(kind, logits, labels).mean().backward()
        optimizer.step()

    return step


def funcdp_step(model, kind, batch, *, mode="auto", compile=False):
    """funcdp's step through `funcdp.hf`'s task (trainable parameters only)."""
    import funcdp as fdp
    import funcdp.hf as fdh

    task = fdh.causal_lm(model) if kind == "causal" else fdh.sequence_classification(model)
    privatizer = fdp.chain(
        fdp.clip(max_norm=1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(noise_multiplier=1.0),
        fdp.normalize(expected_batch_size=len(batch[0])),
        fdp.account(sample_rate=0.01),
    )
    optimizer = fdp.optim.sgd(learning_rate=LEARNING_RATE)
    performance = fdp.Performance(mode=mode, compile=compile)
    train_step = fdp.make_train_step(task.loss_fn, privatizer, optimizer, performance=performance)
    holder = [
        fdp.TrainState.create(
            task.params,
            buffers=task.buffers,
            privatizer=privatizer,
            optimizer=optimizer,
            key=fdp.random.key(0),
        )  # fmt: skip
    ]
    full = fdp.Batch(batch, torch.ones(len(batch[0]), dtype=torch.bool, device=batch[0].device))

    def step():
        holder[0], _ = train_step(holder[0], full)

    return step


def opacus_step(model, kind, batch, *, mode):
    """Opacus's step: `mode` "hooks" or "functorch" (GradSampleModule, DPOptimizer) or "ghost"
    (GradSampleModuleFastGradientClipping, DPOptimizerFastGradientClipping; the loss's two
    backward passes run in `DPTensorFastGradientClipping.backward`)."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    ids, mask, labels = batch
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], LEARNING_RATE)
    options = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": len(ids)}
    if mode == "ghost":
        wrapped = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0)
        optimizer = DPOptimizerFastGradientClipping(sgd, **options)
    else:
        wrapped = GradSampleModule(model, force_functorch=mode == "functorch")
        optimizer = DPOptimizer(sgd, **options)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = wrapped(input_ids=ids, attention_mask=mask).logits
        losses = hf_models.example_losses(kind, logits, labels)
        if mode == "ghost":
            DPTensorFastGradientClipping(wrapped, optimizer, losses).backward()
        else:
            losses.mean().backward()
        optimizer.step()

    return step


STEPS = {
    "nonprivate": nonprivate,
    "funcdp": funcdp_step,
    "funcdp-vmap": lambda *args: funcdp_step(*args, mode="vmap"),
    "funcdp-compiled": lambda *args: funcdp_step(*args, compile=True),
    "funcdp-vmap-compiled": lambda *args: funcdp_step(*args, mode="vmap", compile=True),
    "opacus-hooks": lambda *args: opacus_step(*args, mode="hooks"),
    "opacus-functorch": lambda *args: opacus_step(*args, mode="functorch"),
    "opacus-ghost": lambda *args: opacus_step(*args, mode="ghost"),
}
ENGINES = ["nonprivate", "funcdp", "funcdp-vmap", "opacus-hooks", "opacus-ghost"]


def build_case(name: str, *, seq: int, batch_size: int, device: str = "cpu"):
    """A fresh model `name` on `device`, its kind and one padded batch of it."""
    model, kind = hf_models.build(name, seq)
    model.to(device).train()
    return model, kind, tuple(t.to(device) for t in hf_models.batch(kind, batch_size, seq))


def _time(step, steps: int) -> float:
    step()  # warm-up: the ghost probe, allocator
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=hf_models.NAMES, choices=hf_models.NAMES)
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=list(STEPS))
    parser.add_argument("--seq", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    for name in args.models:
        for seq in args.seq:
            baseline = None
            for engine in args.engines:
                try:
                    case = build_case(name, seq=seq, batch_size=args.batch)
                    step = STEPS[engine](*case)
                    seconds = _time(step, args.steps)
                except Exception as error:  # noqa: BLE001 - reported, the others still run
                    first = (str(error).splitlines() or [type(error).__name__])[0]
                    print(f"{name:10s} seq {seq:4d} {engine:13s} failed: {first:.120}")
                    continue
                baseline = seconds if engine == "nonprivate" else baseline
                ratio = f"{seconds / baseline:5.2f}x" if baseline else "    -"
                print(f"{name:10s} seq {seq:4d} {engine:13s} {seconds * 1e3:9.1f} ms  {ratio}")


if __name__ == "__main__":
    main()

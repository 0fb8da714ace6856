"""Time one DP-SGD step on Hugging Face models with HF's default attention, beside non-private.

Models are built from configs (nothing downloaded): GPT-2 with LoRA adapters (peft), GPT-2 fully
fine-tuned, and a BERT classifier, each on a padded batch with a 2-D attention mask. Engines:
`nonprivate` (one backward of the batch's mean loss, an SGD update), `funcdp` (make_train_step's
defaults: ghost clipping where it applies), `funcdp-vmap` (every example's gradient formed) and
`opacus-hooks` (Opacus's GradSampleModule, per-example clipping and noise by hand). Printed:
median seconds per step and the ratio to the non-private step.

    python bench/hf_step.py --models gpt2-lora bert --seq 128 512 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import funcdp as fdp
import funcdp.hf as fdh

ENGINES = ["nonprivate", "funcdp", "funcdp-vmap", "opacus-hooks"]
MODELS = ["gpt2-lora", "gpt2", "bert"]


def _model(name: str, seq: int):
    import peft
    import transformers

    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(
            vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=1024, max_position_embeddings=max(seq, 512), num_labels=2,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(config), "classification"
    config = transformers.GPT2Config(
        vocab_size=8000, n_positions=max(seq, 512), n_embd=256, n_layer=4, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    if name == "gpt2-lora":
        lora = peft.LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True)
        model = peft.get_peft_model(model, lora)
    return model, "causal"


def _batch(kind: str, size: int, seq: int):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 8000, (size, seq), generator=generator)
    lengths = torch.randint(seq // 2, seq + 1, (size, 1), generator=generator)
    mask = (torch.arange(seq) < lengths).long()
    ids = ids * mask
    labels = fdh.causal_lm_labels(ids, mask) if kind == "causal" else torch.arange(size) % 2
    return ids, mask, labels


def _example_loss(kind: str):
    return fdh.causal_lm_loss if kind == "causal" else fdh.classification_loss


def _nonprivate(model, kind, batch):
    ids, mask, labels = batch
    params = [p for p in model.parameters() if p.requires_grad]
    loss_of = _example_loss(kind)

    def step():
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.stack([loss_of(logits[i], labels[i]) for i in range(len(ids))]).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(0.01 * g)

    return step


def _funcdp(model, kind, batch, mode):
    task = fdh.causal_lm(model) if kind == "causal" else fdh.sequence_classification(model)
    privatizer = fdp.chain(
        fdp.clip(max_norm=1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(noise_multiplier=1.0),
        fdp.normalize(expected_batch_size=len(batch[0])),
        fdp.account(sample_rate=0.01),
    )
    optimizer = fdp.optim.sgd(learning_rate=0.01)
    step = fdp.make_train_step(
        task.loss_fn, privatizer, optimizer, performance=fdp.Performance(mode=mode)
    )
    holder = [
        fdp.TrainState.create(
            task.params,
            buffers=task.buffers,
            privatizer=privatizer,
            optimizer=optimizer,
            key=fdp.random.key(0),
        )  # fmt: skip
    ]
    full = fdp.Batch(batch, torch.ones(len(batch[0]), dtype=torch.bool))

    def run():
        holder[0], _ = step(holder[0], full)

    return run


def _opacus_hooks(model, kind, batch):
    from opacus import GradSampleModule

    ids, mask, labels = batch
    wrapped = GradSampleModule(model, loss_reduction="mean")
    params = [p for p in wrapped.parameters() if p.requires_grad]
    loss_of = _example_loss(kind)
    generator = torch.Generator().manual_seed(0)

    def step():
        logits = wrapped(input_ids=ids, attention_mask=mask).logits
        loss = torch.stack([loss_of(logits[i], labels[i]) for i in range(len(ids))]).mean()
        loss.backward()
        samples = [p.grad_sample.flatten(1) for p in params]
        norms = torch.cat(samples, 1).norm(dim=1)
        factors = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        with torch.no_grad():
            for p, s in zip(params, samples, strict=True):
                noisy = (factors @ s).reshape(p.shape)
                noisy += torch.randn(p.shape, generator=generator)
                p.sub_(0.01 * noisy / len(ids))
                p.grad, p.grad_sample = None, None

    return step


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
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    parser.add_argument("--seq", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    for name in args.models:
        for seq in args.seq:
            baseline = None
            for engine in args.engines:
                model, kind = _model(name, seq)
                model.train()
                batch = _batch(kind, args.batch, seq)
                try:
                    if engine == "nonprivate":
                        step = _nonprivate(model, kind, batch)
                    elif engine == "opacus-hooks":
                        step = _opacus_hooks(model, kind, batch)
                    else:
                        mode = "vmap" if engine == "funcdp-vmap" else "auto"
                        step = _funcdp(model, kind, batch, mode)
                    seconds = _time(step, args.steps)
                except Exception as error:  # noqa: BLE001 - reported, the others still run
                    print(f"{name:10s} seq {seq:4d} {engine:13s} failed: {error!s:.120}")
                    continue
                baseline = seconds if engine == "nonprivate" else baseline
                ratio = f"{seconds / baseline:5.2f}x" if baseline else "    -"
                print(f"{name:10s} seq {seq:4d} {engine:13s} {seconds * 1e3:9.1f} ms  {ratio}")


if __name__ == "__main__":
    main()

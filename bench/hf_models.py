"""The Hugging Face models and batches of the benchmarks, built from configs (nothing downloaded).

GPT-2 (4 layers, width 256, vocabulary 8000) as a causal LM, fully fine-tuned (`gpt2`) or with
LoRA adapters on its attention projections, only the adapters trainable (`gpt2-lora`), and a BERT
classifier of the same size (`bert`). Batches are padded at the right to a random length between
half and all of the sequence, with a 2-D attention mask. Shared by `hf_step.py`, `step_time.py`
and `memory_budget.py`, so that each times the same model.
"""

from __future__ import annotations

import torch

VOCAB = 8000
NAMES = ["gpt2-lora", "gpt2", "bert"]


def build(name: str, seq: int) -> tuple[torch.nn.Module, str]:
    """The model `name` for sequences up to `seq` (seeded) and its kind: "causal" or
    "classification"."""
    import peft
    import transformers

    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=1024, max_position_embeddings=max(seq, 512), num_labels=2,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(config), "classification"
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=max(seq, 512), n_embd=256, n_layer=4, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    if name == "gpt2-lora":
        lora = peft.LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True)
        model = peft.get_peft_model(model, lora)
    return model, "causal"


def batch(kind: str, size: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids [size, seq], attention_mask [size, seq] and labels (per token for "causal",
    IGNORE_INDEX on padding; one class per example otherwise), seeded."""
    import funcdp.hf as fdh

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (size, seq), generator=generator)
    lengths = torch.randint(seq // 2, seq + 1, (size, 1), generator=generator)
    mask = (torch.arange(seq) < lengths).long()
    ids = ids * mask
    labels = fdh.causal_lm_labels(ids, mask) if kind == "causal" else torch.arange(size) % 2
    return ids, mask, labels


def example_losses(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's loss [B] from the batch's logits, by funcdp's per-example losses, so that
    every engine minimises the same function."""
    import funcdp.hf as fdh

    loss = fdh.causal_lm_loss if kind == "causal" else fdh.classification_loss
    return torch.stack([loss(logits[i], labels[i]) for i in range(len(labels))])

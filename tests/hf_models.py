"""Tiny Hugging Face models built from configs (nothing downloaded), shared by the hf tests."""

from __future__ import annotations

import torch

VOCAB, LENGTH = 40, 8


def gpt2(**options):
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        **options,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def gpt2_classifier(**options):
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, num_labels=3,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, summary_first_dropout=0.0, **options,
    )  # fmt: skip
    return transformers.GPT2ForSequenceClassification(config)


def bert(**options):
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **options,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def llama(**options):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, **options,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def gpt2_lora(**options):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"],
                             fan_in_fan_out=True, lora_dropout=0.0)  # fmt: skip
    model = peft.get_peft_model(gpt2(**options), config)
    for name, p in model.named_parameters():  # peft starts lora_B at 0: make the test non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def padded_batch(size: int = 6, seed: int = 0):
    """input_ids and attention_mask [size, LENGTH] with right, left and no padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (size, LENGTH), generator=generator)
    mask = torch.ones(size, LENGTH, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    mask[3, 2:] = 0  # mostly padding
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    return ids, mask

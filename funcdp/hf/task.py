"""A DP train step's pieces for a Hugging Face model: its loss of ONE example, params, buffers.

`causal_lm(model)` and `sequence_classification(model)` return an `HFTask` whose `loss_fn` fits
`funcdp.make_train_step` as is; a batch is `Batch((input_ids, attention_mask, labels), mask)`.
Only the parameters that require grad (a peft model's adapters) are in `params`: they alone are
clipped, noised and updated; frozen weights stay on the model and enter the forward as constants.
HF's attention runs under `vmap_attention` (see `funcdp.hf.attention`), so its default "sdpa"
works under `vmap` with padded batches and 2-D attention masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from funcdp.functional import functionalize
from funcdp.hf.attention import unsupported_implementations, vmap_attention
from funcdp.hf.losses import causal_lm_loss, classification_loss


class HFTask(NamedTuple):
    """What `make_train_step` and `TrainState.create` need for a Hugging Face model.

    Attributes:
      model: the caller's model (never modified); `funcdp.to_module(model, state)` returns a
        trained copy (a peft model's copy saves its adapter alone with `save_pretrained`).
      loss_fn: `loss_fn(params, buffers, input_ids, attention_mask, labels)`, the loss of ONE
        example: input_ids and attention_mask [T], labels [T] (causal LM, -100 where nothing is
        predicted) or [] (classification).
      params: the trainable parameters (requires_grad), keyed as in `named_parameters()`.
      buffers: the model's buffers.
    """

    model: nn.Module
    loss_fn: Callable[..., torch.Tensor]
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


def causal_lm(model: nn.Module) -> HFTask:
    """A causal language model's task: mean next-token loss over each example's real tokens.

    Args:
      model: a `transformers` causal LM (`GPT2LMHeadModel`, `LlamaForCausalLM`, ...) or a peft
        model wrapping one; its output has `.logits` [1, T, V].

    Raises:
      ValueError: no parameter requires grad, or an attention implementation that funcdp
        cannot run under vmap (flash or flex attention).
    """
    return _task(model, causal_lm_loss, {"use_cache": False})


def sequence_classification(model: nn.Module) -> HFTask:
    """A sequence classifier's task: cross-entropy of each example's logits [C] and its label.

    Args:
      model: a `transformers` `...ForSequenceClassification` (or a peft model wrapping one).

    Raises:
      ValueError: as `causal_lm`.
    """
    return _task(model, classification_loss, {})


def _task(model: nn.Module, loss: Callable, options: dict) -> HFTask:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no parameter with requires_grad=True: nothing to train")
    unsupported = unsupported_implementations(model)
    if unsupported:
        raise ValueError(
            f"attention implementation(s) {unsupported} cannot run under vmap; load the model "
            'with attn_implementation="sdpa" (the default) or "eager"'
        )
    apply_fn, params, buffers = functionalize(model)

    def loss_fn(params, buffers, input_ids, attention_mask, labels):
        with vmap_attention(model):
            out = apply_fn(
                params,
                buffers,
                input_ids=input_ids[None],
                attention_mask=attention_mask[None],
                **options,
            )
        return loss(out.logits[0], labels)

    return HFTask(model, loss_fn, params, buffers)

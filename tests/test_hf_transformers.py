"""A Hugging Face transformers model built from a config (no download), trained with funcdp.

Optional: skipped when `transformers` is not installed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import funcdp as fdp

transformers = pytest.importorskip("transformers")

FALLBACK = r".*performance drop because we have not yet implemented the batching rule.*"


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager")


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification._from_config(
        config, attn_implementation="eager"
    )


def _logits_loss(model_name: str, logits: torch.Tensor, tokens: torch.Tensor, label: torch.Tensor):
    if model_name == "gpt2":  # next-token prediction
        return F.cross_entropy(logits[0, :-1], tokens[1:])
    return F.cross_entropy(logits, label[None])


@pytest.mark.parametrize("model_name", ["gpt2", "bert"])
def test_per_example_grads_match_a_loop_and_dp_steps_train(model_name: str) -> None:
    torch.manual_seed(0)
    model = fdp.fix({"gpt2": _gpt2, "bert": _bert}[model_name]()).train()
    tokens, labels = torch.randint(0, 40, (8, 6)), torch.randint(0, 3, (8,))
    assert fdp.validate(model, example_inputs=tokens[:2]) == []
    apply_fn, params, buffers = fdp.functionalize(model)

    def loss_fn(params, buffers, tokens, label):
        logits = apply_fn(params, buffers, input_ids=tokens[None]).logits
        return _logits_loss(model_name, logits, tokens, label)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=FALLBACK, category=UserWarning)
        got = fdp.per_sample_grads(lambda p, t, y: loss_fn(p, buffers, t, y))(
            params, tokens[:3], labels[:3]
        )
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i in range(3):
        logits = model(input_ids=tokens[i : i + 1]).logits
        grads = torch.autograd.grad(
            _logits_loss(model_name, logits, tokens[i], labels[i]), list(named.values())
        )
        for name, g in zip(named, grads, strict=True):
            torch.testing.assert_close(got[name][i], g, rtol=1e-4, atol=1e-5, msg=name)

    privatizer = fdp.chain(
        fdp.clip(max_norm=1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(noise_multiplier=1.0),
        fdp.normalize(expected_batch_size=8),
        fdp.account(sample_rate=0.1),
    )
    optimizer = fdp.optim.adam(learning_rate=1e-2)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    batch = fdp.Batch((tokens, labels), torch.ones(8, dtype=torch.bool))
    for _ in range(3):
        state, metrics = step(state, batch)
        assert not metrics["skipped"] and metrics["batch_size"] == 8
    assert state.step == 3 and all(torch.isfinite(p).all() for p in state.params.values())
    assert 0 < fdp.epsilon(state.ledger, delta=1e-5) < float("inf")

"""funcdp.hf in a DP train step: GPT-2 + LoRA trains, only the adapter changes, it reloads."""

from __future__ import annotations

import pytest
import torch

import funcdp as fdp

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import funcdp.hf as fdh  # noqa: E402
from tests import hf_models  # noqa: E402


def _counting_data(size: int, seed: int):
    """Sequences that count up (mod the vocabulary), right-padded to random lengths."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, hf_models.VOCAB, (size, 1), generator=generator)
    ids = (start + torch.arange(hf_models.LENGTH)) % hf_models.VOCAB
    lengths = torch.randint(4, hf_models.LENGTH + 1, (size, 1), generator=generator)
    mask = (torch.arange(hf_models.LENGTH) < lengths).long()
    return ids * mask, mask


def _setup(task, *, sigma: float, q: float, lr: float):
    privatizer = fdp.chain(
        fdp.clip(max_norm=1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(noise_multiplier=sigma),
        fdp.normalize(expected_batch_size=16),
        fdp.account(sample_rate=q),
    )
    optimizer = fdp.optim.adam(learning_rate=lr)
    step = fdp.make_train_step(task.loss_fn, privatizer, optimizer)
    state = fdp.TrainState.create(
        task.params, buffers=task.buffers, privatizer=privatizer, optimizer=optimizer,
        key=fdp.random.key(0),
    )  # fmt: skip
    return step, state


def _mean_loss(task, params, ids, mask) -> float:
    evaluate = fdp.make_eval_step(task.loss_fn)
    labels = fdh.causal_lm_labels(ids, mask)
    state = fdp.TrainState(params, task.buffers, None, None, fdp.random.key(0), 0)
    return evaluate(state, fdp.Batch((ids, mask, labels), torch.ones(len(ids), dtype=torch.bool)))[
        "loss"
    ]


def test_gpt2_lora_dp_steps_reduce_the_loss_and_change_only_the_adapter(tmp_path) -> None:
    torch.manual_seed(0)
    model = hf_models.gpt2_lora(initializer_range=0.2).train()
    task = fdh.causal_lm(model)
    assert task.params and all("lora_" in name for name in task.params)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids, mask = _counting_data(64, seed=1)
    q = 16 / 64
    step, state = _setup(task, sigma=0.3, q=q, lr=5e-2)
    before = _mean_loss(task, state.params, ids, mask)
    loader = fdp.PoissonLoader(
        (ids, mask, fdh.causal_lm_labels(ids, mask)), q, key=fdp.random.key(3), steps=60
    )
    for batch in loader:
        state, metrics = step(state, batch)
        assert not metrics["skipped"]
    after = _mean_loss(task, state.params, ids, mask)
    assert after < before - 0.5, (before, after)
    # Only the adapter changed; the model handed in is untouched.
    assert all(not torch.equal(state.params[n], task.params[n]) for n in task.params)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    # The adapter alone is saved, and reloads onto a fresh base model with the trained values.
    fdh.save_adapter(model, state, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_config.json" in files and any(f.startswith("adapter_model") for f in files)
    torch.manual_seed(0)
    base = hf_models.gpt2(initializer_range=0.2)  # same seed: the same frozen base weights
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    loaded = dict(reloaded.named_parameters())
    for name, value in state.params.items():
        torch.testing.assert_close(loaded[name].detach(), value, rtol=0, atol=0, msg=name)
    assert 0 < fdp.epsilon(state.ledger, delta=1e-5) < float("inf")


def test_save_adapter_refuses_a_model_without_adapter() -> None:
    model = hf_models.gpt2()
    task = fdh.causal_lm(model)
    state = fdp.TrainState(task.params, task.buffers, None, None, fdp.random.key(0), 0)
    with pytest.raises(TypeError, match="peft.PeftModel"):
        fdh.save_adapter(model, state, "unused")


def test_epsilon_per_epoch_matches_the_accountant_and_grows() -> None:
    eps = fdh.epsilon_per_epoch(noise_multiplier=1.0, sample_rate=0.25, epochs=3, delta=1e-5)
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2]
    expected = fdp.dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.25, steps=8, delta=1e-5)
    assert eps[1] == pytest.approx(expected)
    pld = fdh.epsilon_per_epoch(
        noise_multiplier=1.0, sample_rate=0.25, epochs=1, delta=1e-5, method="pld"
    )
    expected = fdp.dpsgd_epsilon(
        noise_multiplier=1.0, sample_rate=0.25, steps=4, delta=1e-5, method="pld"
    )
    assert pld == [pytest.approx(expected)]
    with pytest.raises(ValueError, match="epochs"):
        fdh.epsilon_per_epoch(noise_multiplier=1.0, sample_rate=0.25, epochs=0, delta=1e-5)


def test_tasks_refuse_frozen_models_and_flash_attention() -> None:
    model = hf_models.gpt2().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        fdh.causal_lm(model)
    model = hf_models.gpt2()
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        fdh.causal_lm(model)


@pytest.mark.slow  # inductor compiles the HF step: ~1.5-2.5 minutes per mode on 2 CPU cores
@pytest.mark.parametrize("mode", ["auto", "vmap"])  # auto: ghost clipping for every LoRA matrix
def test_a_compiled_gpt2_lora_step_gives_the_eager_parameters(mode) -> None:
    torch.manual_seed(0)
    task = fdh.causal_lm(hf_models.gpt2_lora().train())
    ids, mask = hf_models.padded_batch(size=8)
    rows = torch.ones(8, dtype=torch.bool)
    rows[-1] = False  # a padded row
    batch = fdp.Batch((ids, mask, fdh.causal_lm_labels(ids, mask)), rows)

    def run(performance):
        privatizer = fdp.chain(
            fdp.clip(max_norm=0.1),  # below every example's norm: all are clipped
            fdp.aggregate(),
            fdp.gaussian_noise(noise_multiplier=1.0),
            fdp.normalize(expected_batch_size=8),
            fdp.account(sample_rate=0.5),
        )
        optimizer = fdp.optim.adam(learning_rate=1e-2)
        step = fdp.make_train_step(task.loss_fn, privatizer, optimizer, performance=performance)
        state = fdp.TrainState.create(
            task.params, buffers=task.buffers, privatizer=privatizer, optimizer=optimizer,
            key=fdp.random.key(0),
        )  # fmt: skip
        metrics = []
        for _ in range(3):
            state, info = step(state, batch)
            metrics.append(info)
        return state, metrics

    eager, eager_metrics = run(fdp.Performance(mode=mode))
    compiled, compiled_metrics = run(fdp.Performance(mode=mode, compile=True))
    assert compiled.step == eager.step == 3
    assert any(not torch.equal(eager.params[n], task.params[n]) for n in task.params)
    for name, value in eager.params.items():
        torch.testing.assert_close(compiled.params[name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert fdp.epsilon(compiled.ledger, delta=1e-5) == fdp.epsilon(eager.ledger, delta=1e-5)
    for got, want in zip(compiled_metrics, eager_metrics, strict=True):
        assert got["batch_size"] == want["batch_size"] == 7 and got["clipped_fraction"] == 1.0
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)

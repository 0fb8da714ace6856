"""funcdp.hf: HF models with their DEFAULT attention, padded batches and 2-D masks, under vmap."""

from __future__ import annotations

import warnings

import pytest
import torch

import funcdp as fdp

pytest.importorskip("transformers")
pytest.importorskip("peft")

import funcdp.hf as fdh  # noqa: E402
from tests import hf_models  # noqa: E402

FALLBACK = r".*performance drop because we have not yet implemented the batching rule.*"
CLIP = 0.05


def _task_and_labels(name: str):
    torch.manual_seed(0)
    model = {"gpt2": hf_models.gpt2, "bert": hf_models.bert, "llama": hf_models.llama,
             "gpt2_lora": hf_models.gpt2_lora, "gpt2_classifier": hf_models.gpt2_classifier,
             }[name]()  # fmt: skip
    ids, mask = hf_models.padded_batch()
    if name in ("bert", "gpt2_classifier"):
        return fdh.sequence_classification(model), ids, mask, torch.tensor([0, 1, 2, 0, 1, 2])
    return fdh.causal_lm(model), ids, mask, fdh.causal_lm_labels(ids, mask)


def _loop_clipped_sum(task, ids, mask, labels, clip):
    """A plain per-example loop: the model's own (default) attention, a batch of one each."""
    model = task.model
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in named.items()}
    norms = []
    for i in range(ids.shape[0]):
        out = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        if labels.dim() == 1:  # one class label per example
            loss = fdh.classification_loss(out.logits[0], labels[i])
        else:
            loss = fdh.causal_lm_loss(out.logits[0], labels[i])
        grads = torch.autograd.grad(loss, list(named.values()))
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, clip / float(norm))
        for n, g in zip(named, grads, strict=True):
            total[n] += factor * g
    return total, torch.tensor(norms, dtype=torch.float64)


@pytest.mark.parametrize("name", ["gpt2_lora", "gpt2", "bert", "llama", "gpt2_classifier"])
@pytest.mark.parametrize("mode", ["vmap", "ghost"])
def test_clipped_sum_equals_a_per_example_loop_with_padding_and_masks(name, mode) -> None:
    task, ids, mask, labels = _task_and_labels(name)
    task.model.train()
    assert task.model.config._attn_implementation == "sdpa"  # HF's default, untouched

    fn = fdp.clipped_sum(task.loss_fn, max_norm=CLIP, mode=mode)  # the train step's loss
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=FALLBACK, category=UserWarning)
        result = fn(task.params, task.buffers, ids, mask, labels)
    summed, norms = result.grads, result.norms
    expected, expected_norms = _loop_clipped_sum(task, ids, mask, labels, CLIP)
    assert set(summed) == set(expected)
    torch.testing.assert_close(norms.double(), expected_norms, rtol=1e-5, atol=1e-7)
    assert (expected_norms > CLIP).sum() >= 2  # the clip is active
    for n, g in expected.items():
        torch.testing.assert_close(summed[n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_vmap_attention_matches_hf_default_outputs() -> None:
    for build in (hf_models.gpt2, hf_models.bert, hf_models.llama):
        torch.manual_seed(1)
        model = build().eval()
        ids, mask = hf_models.padded_batch()
        with torch.no_grad():
            reference = model(input_ids=ids, attention_mask=mask).logits
            with fdh.vmap_attention(model):
                assert model.config._attn_implementation == "funcdp_sdpa"
                switched = model(input_ids=ids, attention_mask=mask).logits
            assert model.config._attn_implementation == "sdpa"  # restored
        real = mask.bool() if reference.dim() == 3 else torch.ones(len(ids), dtype=torch.bool)
        torch.testing.assert_close(switched[real], reference[real], rtol=1e-5, atol=1e-5)


def test_math_attention_matches_torch_including_fully_masked_rows() -> None:
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.4
    mask[0, 0, 1] = False  # a query that sees no key
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(fdh.math_attention(q, k, v, attn_mask=mask), expected)
    assert torch.equal(fdh.math_attention(q, k, v, attn_mask=mask)[0, :, 1], torch.zeros(4, 8))
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(fdh.math_attention(q, k, v, is_causal=True, scale=0.3), causal)
    k2, v2 = k[:, :2], v[:, :2]
    gqa = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, enable_gqa=True)
    torch.testing.assert_close(fdh.math_attention(q, k2, v2, enable_gqa=True), gqa)
    q.requires_grad_()
    fdh.math_attention(q, k, v, attn_mask=mask).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_causal_lm_loss_is_the_mean_over_real_tokens_of_one_example() -> None:
    logits = torch.randn(5, 7)
    labels = torch.tensor([3, 1, -100, 4, -100])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([1, 4]))
    torch.testing.assert_close(fdh.causal_lm_loss(logits, labels), expected)
    nothing = fdh.causal_lm_loss(logits, torch.full((5,), -100))
    assert nothing.item() == 0.0


def test_import_funcdp_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, funcdp; sys.exit('transformers' in sys.modules or 'peft' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""Ghost clipping of Hugging Face layers: Conv1D (`torch.addmm`) and tied embeddings.

Full GPT-2 fine-tuning runs with no vmap fallback, and ghost norms and clipped sums equal vmap's;
the new rules' norms are certified upper bounds for crafted inputs (the engine check).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import funcdp as fdp
from funcdp.ghost import bounds, capture, ghost_clipped_sum, matmul, tied
from funcdp.testing import check_engine_sensitivity, sequence_examples

transformers = pytest.importorskip("transformers")

import funcdp.hf as fdh  # noqa: E402
from tests import hf_models  # noqa: E402


@pytest.mark.parametrize("formed", [True, False], ids=["as-chosen", "gram-only"])
@pytest.mark.parametrize("layer", ["addmm", "tied"])
def test_every_engine_bounds_crafted_hf_examples(layer, formed, monkeypatch):
    """Small ops mostly take the formed gradient (it is cheaper); "gram-only" sends every op
    that is not smaller formed through the Gram form."""
    if not formed:
        monkeypatch.setattr(bounds, "EXPLICIT_ELEMENTS", 0)
    check_engine_sensitivity(sequence_examples(layers=(layer,)), max_norm=1.0, max_examples=40)


def _gpt2_task():
    torch.manual_seed(0)
    task = fdh.causal_lm(hf_models.gpt2().train())
    ids, mask = hf_models.padded_batch()
    return task, (ids, mask, fdh.causal_lm_labels(ids, mask))


@pytest.mark.parametrize("formed", [False, True], ids=["gram", "all-formed"])
def test_full_gpt2_has_no_vmap_fallback_and_ghost_equals_vmap(formed, monkeypatch):
    """ "gram": no gradient is formed for speed, so the output layer and the tied embedding take
    the Gram form; "all-formed": every linear op and the tied embedding take the formed
    gradient, as on long sequences."""
    calls = []
    formed_tied = tied._formed_tied
    monkeypatch.setattr(tied, "_formed_tied", lambda *a: calls.append(1) or formed_tied(*a))
    if formed:
        monkeypatch.setattr(matmul, "matmul_form", lambda *shape: "formed: every op")
    else:
        monkeypatch.setattr(bounds, "EXPLICIT_ELEMENTS", 0)
    task, batch = _gpt2_task()
    assert task.model.lm_head.weight is task.model.transformer.wte.weight  # tied

    def loss(params, *example):
        return task.loss_fn(params, task.buffers, *example)

    plan = capture.plan(loss, task.params, batch)
    assert plan.fallback == () and plan.ghost == frozenset(task.params)
    assert sorted(plan.uses["transformer.wte.weight"]) == list(capture.TIED)
    assert plan.uses["transformer.h.0.attn.c_attn.weight"] == ("ghost addmm.weight",)
    for clip in (1e-3, 0.05, 100.0):  # all clipped, some, none
        ghost, vmapped = (
            fdp.clipped_sum(task.loss_fn, max_norm=clip, mode=mode)(
                task.params, task.buffers, *batch
            )
            for mode in ("ghost", "vmap")
        )
        summed, norms = vmapped.grads, vmapped.norms
        torch.testing.assert_close(ghost.norms, norms, rtol=1e-5, atol=0)
        for name, g in summed.items():
            torch.testing.assert_close(ghost.grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert bool(calls) == formed


@pytest.mark.parametrize(
    "vocab, elements, formed",
    [(20, 0, False), (8, 0, True), (20, bounds.EXPLICIT_ELEMENTS, True)],
    ids=["gram", "formed-smaller", "formed-cheaper"],
)
def test_tied_norm_is_the_norm_of_the_summed_gradient_not_the_sum_of_norms(
    vocab, elements, formed, monkeypatch
):
    """The two uses' gradients cancel: the norm of their sum is far below the sum of norms,
    whether the output layer (over `width` positions) takes the Gram form or its gradient is
    formed: no larger than the Grams (2 T^2 >= V d), or cheaper (V d < 4 T (V + d)) within
    the memory allowed."""
    width, positions = 8, 6
    monkeypatch.setattr(bounds, "EXPLICIT_ELEMENTS", elements)
    assert (matmul.matmul_form(2, width, vocab, width) != matmul.GRAM) == formed
    calls = []
    formed_tied = tied._formed_tied
    monkeypatch.setattr(tied, "_formed_tied", lambda *a: calls.append(1) or formed_tied(*a))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, positions), generator=gen)
    g = torch.randn(2, positions, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen)
    x = torch.eye(width).expand(2, -1, -1).clone()
    h = torch.empty(2, width, vocab)
    for i in range(2):
        grad_e = torch.zeros(vocab, width).index_add(0, ids[i], g[i])
        h[i] = -0.5 * grad_e.T  # the linear use's gradient is -0.5 times the embedding's

    def loss(params, ids, g, x, h):
        w = params["weight"]
        return (F.embedding(ids, w) * g).sum() + (F.linear(x, w) * h).sum()

    result = ghost_clipped_sum(loss, max_norm=1e9)({"weight": weight}, ids, g, x, h)
    for i in range(2):
        exact = torch.zeros(vocab, width).index_add(0, ids[i], g[i]).double().norm() * 0.5
        # The Gram form bounds the exact gradient's norm; a formed gradient is what is summed,
        # so its norm (read from it) may sit below the exact one by its rounding.
        lowest = float(exact) * (1 - 1e-6 if formed else 1)
        assert lowest <= float(result.norms[i]) <= float(exact) * (1 + 1e-5)
    assert len(calls) == formed


def test_addmm_with_scaled_terms_is_left_to_vmap():
    weight, bias = torch.randn(3, 2), torch.randn(2)

    def loss(params, x):
        return torch.addmm(params["bias"], x, params["weight"], beta=0.5).sum()

    plan = capture.plan(loss, {"weight": weight, "bias": bias}, (torch.randn(2, 4, 3),))
    assert set(plan.fallback) == {"weight", "bias"}
    assert plan.uses["weight"] == ("addmm.weight",)


def test_a_full_gpt2_step_in_ghost_mode_equals_the_vmap_step():
    task, batch = _gpt2_task()
    privatizer = fdp.chain(
        fdp.clip(max_norm=0.05),
        fdp.aggregate(),
        fdp.gaussian_noise(noise_multiplier=1.0),
        fdp.normalize(expected_batch_size=6),
        fdp.account(sample_rate=0.1),
    )
    optimizer = fdp.optim.sgd(learning_rate=0.1)
    mask = torch.tensor([True, True, True, True, False, True])  # a padded row too
    states = {}
    for mode in ("ghost", "vmap"):
        step = fdp.make_train_step(
            task.loss_fn, privatizer, optimizer, performance=fdp.Performance(mode=mode)
        )
        state = fdp.TrainState.create(
            task.params, buffers=task.buffers, privatizer=privatizer, optimizer=optimizer,
            key=fdp.random.key(0),
        )  # fmt: skip
        states[mode], metrics = step(state, fdp.Batch(batch, mask))
        assert metrics["batch_size"] == 5 and metrics["clipped_fraction"] > 0
    for name, value in states["vmap"].params.items():
        torch.testing.assert_close(states["ghost"].params[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "count, positions, p, d, formed",
    [
        (8, 128, 8000, 256, True),  # an LM output layer: too wide to certify in float32
        (4, 512, 8000, 256, True),  # and a long sequence at 512 positions
        (8, 32, 768, 256, False),  # GPT-2's c_attn at 32 positions: the Gram form
        (8, 64, 768, 256, True),  # at 64: cheaper formed (p d = 3 T (p + d))
        (8, 128, 768, 256, True),  # at 128: a long sequence
        (8, 512, 768, 256, True),  # at 512: no larger than the Grams
        (32, 64, 384, 128, True),  # the benchmark transformer's in-projection
        (32, 64, 768, 768, False),  # 768 x 768 at 64 positions (p d = 6 T (p + d)): Grams
        (64, 128, 50257, 768, False),  # GPT-2's real vocabulary at batch 64: 9.9 GB if formed
        (8, 128, 3072, 768, True),  # GPT-2 small's MLP at batch 8: 19M elements formed
        (2, 8, 8000, 256, False),  # small Grams are computed in float64: no width problem
    ],
)
def test_the_gram_form_or_the_formed_gradient_by_cost(count, positions, p, d, formed):
    assert (matmul.matmul_form(count, positions, p, d) != matmul.GRAM) == formed


def test_a_pass_forms_gradients_for_speed_within_one_memory_budget():
    """Every op of a pass draws on one budget: GPT-2 small's 12 MLP input layers at 128
    positions, batch 8 (19M elements each) are formed while the pass's 2^26 elements last, then
    take the Gram form; ops no larger than their Grams are formed whatever is left."""
    budget = matmul.Budget()
    forms = [budget.choose(8, 128, 3072, 768) for _ in range(12)]
    assert forms.count(matmul.GRAM) == 9 and forms[:3] == [forms[0]] * 3 != [matmul.GRAM] * 3
    assert matmul.matmul_form(8, 128, 64, 64, budget.left) == matmul.SMALLER

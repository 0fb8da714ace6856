"""funcdp.explain: per parameter, ghost or vmap, and why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import funcdp as fdp
from funcdp.explain import explain, format_explanations


def test_explain_names_the_op_behind_each_fallback():
    params = {
        "linear": torch.randn(3, 4),
        "scaled": torch.randn(4, 3),
        "matrix": torch.randn(4, 4),
        "shared": torch.randn(4, 4),
        "unused": torch.randn(2),
    }

    def loss_fn(params, buffers, x):
        del buffers
        h = F.linear(x, params["linear"].T @ params["linear"])  # 'linear' read by matmul
        h = torch.addmm(torch.zeros(3), h, params["scaled"], alpha=2.0)
        h = F.linear(h @ params["matrix"][:3, :3], params["shared"][:3, :3])
        return (h + F.linear(h, params["shared"][:3, :3])).sum()

    batch = fdp.Batch((torch.randn(5, 2, 4),), torch.ones(5, dtype=torch.bool))
    found = {e.parameter: e for e in explain(loss_fn, params, batch)}
    assert all(e.engine == "vmap" for e in found.values())
    assert "matmul" in found["linear"].reason
    assert "addmm" in found["scaled"].reason and "beta or alpha" in found["scaled"].reason
    assert "no ghost rule" in found["matrix"].reason
    assert "never reads" in found["unused"].reason


def test_explain_on_gpt2_full_and_lora():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import funcdp.hf as fdh
    from tests import hf_models

    torch.manual_seed(0)
    ids, mask = hf_models.padded_batch()
    for build, count in ((hf_models.gpt2, 28), (hf_models.gpt2_lora, 16)):
        task = fdh.causal_lm(build())
        labels = fdh.causal_lm_labels(ids, mask)
        found = explain(task.loss_fn, task.params, (ids, mask, labels), buffers=task.buffers)
        assert len(found) == count == len(task.params)
        assert all(e.engine == "ghost" for e in found), format_explanations(found)
    wte = next(e for e in explain(*_gpt2_args()) if e.parameter == "transformer.wte.weight")
    assert "tied" in wte.reason and len(wte.uses) == 2
    text = format_explanations(explain(*_gpt2_args()))
    assert text.startswith("ghost clipping: 28 of 28 parameters")


def _gpt2_args():
    import funcdp.hf as fdh
    from tests import hf_models

    torch.manual_seed(0)
    task = fdh.causal_lm(hf_models.gpt2())
    ids, mask = hf_models.padded_batch()
    return task.loss_fn, task.params, (ids, mask, fdh.causal_lm_labels(ids, mask))


def test_explain_reports_a_conv_sent_to_vmap_for_speed():
    params = {"weight": torch.randn(2, 3, 3)}

    def loss_fn(params, buffers, x):
        del buffers
        return F.conv1d(x, params["weight"]).sum()

    (found,) = explain(loss_fn, params, (torch.randn(4, 3, 50),))
    assert found.engine == "vmap"
    assert "batched conv backward" in found.reason
    (kept,) = explain(loss_fn, params, (torch.randn(4, 3, 50),), conv_explicit="unfold")
    assert kept.engine == "ghost" and kept.reason == "conv.weight"


@pytest.mark.parametrize(
    "width, out, positions, batch, form",
    [
        (8, 4, 1, 4, "one position"),
        (8, 4, 16, 4, "formed: no larger"),
        (64, 512, 4, 4, "Gram form"),
        (180, 180, 100, 4, "formed: cheaper"),
        (256, 256, 16, 4, "Gram form"),
        (256, 8000, 40, 8, "formed: too wide"),
    ],
)
def test_explain_says_how_each_linear_weight_norm_is_taken(width, out, positions, batch, form):
    """Gram matrices over the positions, or the per-example gradient formed, and why: chosen
    by the op's shape at this batch's size and sequence length."""
    params = {"weight": torch.zeros(out, width)}

    def loss_fn(params, buffers, x):
        del buffers
        return F.linear(x, params["weight"]).sum()

    shape = (batch, width) if positions == 1 else (batch, positions, width)
    (found,) = explain(loss_fn, params, (torch.randn(shape),))
    assert found.engine == "ghost" and form in found.reason, found.reason

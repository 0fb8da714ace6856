"""validate on Hugging Face models: checked as funcdp.hf runs them, faults named with their line.

The models are HF's, with their DEFAULT attention ("sdpa") and padded 2-D attention masks; that
funcdp.hf's losses on them equal a per-example loop is tests/test_hf.py's.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcdp as fdp

pytest.importorskip("transformers")
pytest.importorskip("peft")

import funcdp.hf as fdh  # noqa: E402
from funcdp._findings import VMAP_ERROR  # noqa: E402
from tests import hf_models  # noqa: E402

BUILDS = [hf_models.gpt2_lora, hf_models.gpt2, hf_models.bert, hf_models.llama]


def _inputs() -> dict[str, torch.Tensor]:
    ids, mask = hf_models.padded_batch()
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("build", [*BUILDS, hf_models.gpt2_classifier], ids=lambda b: b.__name__)
def test_with_inputs_a_model_funcdp_hf_trains_has_no_finding(build) -> None:
    model = build()
    assert model.config._attn_implementation == "sdpa"  # HF's default
    assert fdp.validate(model, example_kwargs=_inputs()) == []
    assert model.config._attn_implementation == "sdpa"  # switched only while the run ran
    # Without inputs validate cannot run the model, so it names the attention that fails when
    # the model is called as it is, and the ways funcdp runs it.
    [static] = fdp.validate(model)
    assert static.kind == "hf_attention" and static.fixable
    assert "funcdp.hf" in static.fix and "vmap_attention" in static.fix


def test_eager_attention_of_a_bidirectional_model_runs_as_funcdp_hf_runs_it() -> None:
    import transformers

    config = hf_models.bert().config
    eager = transformers.BertForSequenceClassification._from_config(
        config, attn_implementation="eager"
    )
    assert fdp.validate(eager, example_kwargs=_inputs()) == []
    assert eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("build", BUILDS, ids=lambda b: b.__name__)
def test_fix_switches_the_attention_of_a_copy_to_the_same_function(build) -> None:
    model = build()
    inputs = _inputs()
    fixed, changes = fdp.fix(model, return_changes=True)
    assert changes and all(not c.changes_function for c in changes)
    assert fdp.validate(fixed) == [] and fdp.validate(fixed, example_kwargs=inputs) == []
    assert model.config._attn_implementation == "sdpa"  # the original is untouched
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        got = fixed.eval()(**inputs).logits
    real = inputs["attention_mask"].bool() if expected.dim() == 3 else slice(None)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_input_ids_without_their_mask_are_named_as_the_cause() -> None:
    model = hf_models.gpt2_classifier()  # has a pad_token_id: HF looks for it in input_ids
    [finding] = fdp.validate(model, example_inputs=_inputs()["input_ids"])
    assert finding.kind == VMAP_ERROR and "warn_if_padding_and_no_attention_mask" in finding.problem
    assert finding.fix.startswith("pass the attention_mask")


class _ItemMLP(nn.Module):
    """Wraps a decoder block's MLP with a forward that reads a tensor's value in Python."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, hidden):
        if hidden.sum().item() > 0:  # the line validate must name
            return self.mlp(hidden)
        return self.mlp(-hidden)


def _item_line() -> int:
    return _ItemMLP.forward.__code__.co_firstlineno + 1


@pytest.mark.parametrize(
    "build, where",
    [
        (hf_models.gpt2, "transformer.h.0.mlp"),
        (hf_models.llama, "model.layers.0.mlp"),
        (hf_models.gpt2_lora, "base_model.model.transformer.h.0.mlp"),
    ],
    ids=["gpt2", "llama", "gpt2_lora"],
)
def test_an_item_in_a_forward_is_still_found_with_its_module_and_line(build, where) -> None:
    model = build()
    block = model.get_submodule(where.rpartition(".")[0])
    block.mlp = _ItemMLP(block.mlp)
    [finding] = fdp.validate(model, example_kwargs=_inputs())
    assert finding.kind == VMAP_ERROR and finding.submodule == where
    assert finding.problem.startswith("_ItemMLP fails under vmap(grad)")
    assert f"test_hf_validate.py:{_item_line()} in forward" in finding.problem
    assert ".item()" in finding.fix and "torch.where" in finding.fix
    assert not finding.fixable


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_a_loss_of_your_own_gets_the_mask_cause_and_vmap_attention_repairs_it() -> None:
    torch.manual_seed(0)
    model = hf_models.bert()
    apply_fn, params, buffers = fdp.functionalize(model)
    inputs = _inputs()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def as_it_is(params, buffers, ids, mask, label):
        out = apply_fn(params, buffers, input_ids=ids[None], attention_mask=mask[None])
        return F.cross_entropy(out.logits, label[None])

    def switched(params, buffers, ids, mask, label):
        with fdh.vmap_attention(model):
            return as_it_is(params, buffers, ids, mask, label)

    privatizer = fdp.chain(fdp.clip(max_norm=1.0), fdp.aggregate())
    optimizer = fdp.optim.sgd(learning_rate=0.1)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    batch = fdp.Batch((*inputs.values(), labels), torch.ones(6, dtype=torch.bool))
    vmap = fdp.Performance(mode="vmap")  # ghost would try first, warn and take vmap
    step = fdp.make_train_step(as_it_is, privatizer, optimizer, performance=vmap)
    with pytest.raises(RuntimeError) as raised:
        step(state, batch)
    (note,) = raised.value.__notes__
    assert "masking_utils.py:" in note and "funcdp.hf.vmap_attention(model)" in note
    new_state, metrics = fdp.make_train_step(switched, privatizer, optimizer)(state, batch)
    assert new_state.step == 1 and metrics["batch_size"] == 6

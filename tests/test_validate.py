"""funcdp.validate / fix / check_supported: findings name the submodule; fixes are reported."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcdp as fdp
import funcdp.nn as fnn
from funcdp._findings import (
    BUFFERS_CHANGE,
    MIXES_EXAMPLES,
    NO_BATCHING_RULE,
    SPARSE_GRADIENT,
    UNUSED_PARAMETER,
    VMAP_ERROR,
    WEIGHT_CHANGED_IN_FORWARD,
    UnsupportedModuleError,
)
from funcdp.validate import check_supported


def _kinds(findings):
    return {(f.submodule, f.kind) for f in findings}


# ---------------------------------------------------------------- static findings and fixes


def test_batchnorm_is_found_and_replaced_by_groupnorm_with_a_reported_group_count(caplog) -> None:
    model = nn.Sequential(nn.Conv2d(3, 48, 3), nn.BatchNorm2d(48), nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    [finding] = fdp.validate(model)
    assert (finding.submodule, finding.kind, finding.fixable) == ("1", MIXES_EXAMPLES, True)
    assert "GroupNorm" in finding.fix
    with caplog.at_level(logging.INFO, logger="funcdp.validate"):
        fixed, changes = fdp.fix(model, return_changes=True)
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
    norm = fixed[1]
    assert isinstance(norm, nn.GroupNorm) and (norm.num_groups, norm.num_channels) == (16, 48)
    torch.testing.assert_close(norm.weight, model[1].weight)
    [change] = changes
    assert (
        change.submodule == "1" and change.after == "GroupNorm(16, 48)" and change.changes_function
    )
    assert "gcd(32, 48)" in change.note
    assert any(
        r.levelno == logging.WARNING and "GroupNorm(16, 48)" in r.getMessage()
        for r in caplog.records
    )
    assert fdp.validate(fixed) == []
    assert isinstance(fdp.fix(model), nn.Sequential)  # plain call returns only the module


@pytest.mark.parametrize(
    ("layer", "drop_in"),
    [
        (nn.LSTM(3, 4), fnn.LSTM),
        (nn.GRU(3, 4), fnn.GRU),
        (nn.RNN(3, 4), fnn.RNN),
        (nn.MultiheadAttention(4, 2), fnn.MultiheadAttention),
        (nn.Bilinear(2, 3, 4), fnn.Bilinear),
        (nn.EmbeddingBag(5, 3), fnn.EmbeddingBag),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v.__name__,
)
def test_layers_without_batching_rules_are_found_and_swapped_for_drop_ins(
    layer, drop_in, caplog
) -> None:
    model = nn.ModuleDict({"inner": nn.ModuleList([layer])})
    [finding] = fdp.validate(model)
    assert (finding.submodule, finding.kind, finding.fixable) == ("inner.0", NO_BATCHING_RULE, True)
    assert f"funcdp.nn.{drop_in.__name__}" in finding.fix
    with caplog.at_level(logging.INFO, logger="funcdp.validate"):
        fixed, [change] = fdp.fix(model, return_changes=True)
    assert type(fixed["inner"][0]) is drop_in and not change.changes_function
    assert any("inner.0" in r.getMessage() for r in caplog.records)
    assert list(fixed.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(fixed.state_dict()[key], value)
    assert fdp.validate(fixed) == []


def test_transformer_encoder_layer_is_swapped_with_its_attention() -> None:
    model = nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, batch_first=True))
    assert _kinds(fdp.validate(model)) == {
        ("0", NO_BATCHING_RULE),
        ("0.self_attn", NO_BATCHING_RULE),
    }
    fixed, changes = fdp.fix(model, return_changes=True)
    assert [(c.submodule, c.after) for c in changes] == [
        ("0", "funcdp.nn.TransformerEncoderLayer"),
        ("0.self_attn", "funcdp.nn.MultiheadAttention"),
    ]
    assert type(fixed[0]) is fnn.TransformerEncoderLayer
    assert type(fixed[0].self_attn) is fnn.MultiheadAttention
    assert fdp.validate(fixed) == [] and torch.backends.mha.get_fastpath_enabled()
    x = torch.randn(2, 3, 4)
    with torch.no_grad():  # eval mode: torch's fused fast path vs the plain path
        torch.testing.assert_close(fixed.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_a_shared_submodule_is_replaced_once_and_stays_shared() -> None:
    shared = nn.LSTM(2, 2, batch_first=True)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    fixed, changes = fdp.fix(model, return_changes=True)
    assert [c.submodule for c in changes] == ["a"]
    assert type(fixed["a"]) is fnn.LSTM and fixed["a"] is fixed["b"][0]


def test_fix_replaces_the_root_module_itself() -> None:
    fixed, [change] = fdp.fix(nn.GRU(2, 3), return_changes=True)
    assert type(fixed) is fnn.GRU and change.submodule == "GRU"


def test_running_stats_sparse_max_norm_and_spectral_norm_are_found() -> None:
    model = nn.ModuleDict(
        {
            "inorm": nn.InstanceNorm1d(3, track_running_stats=True),
            "sparse": nn.Embedding(5, 2, sparse=True),
            "capped": nn.Embedding(5, 2, max_norm=1.0),
            "spectral": nn.utils.parametrizations.spectral_norm(nn.Linear(2, 2)),
        }
    )
    found = {(f.submodule, f.kind): f.fixable for f in fdp.validate(model)}
    assert found == {
        ("inorm", BUFFERS_CHANGE): True,
        ("sparse", SPARSE_GRADIENT): True,
        ("capped", WEIGHT_CHANGED_IN_FORWARD): False,
        ("spectral.parametrizations.weight.0", BUFFERS_CHANGE): False,
    }
    fixed, changes = fdp.fix(model, return_changes=True)
    assert {c.submodule for c in changes} == {"inorm", "sparse"}
    assert not fixed["inorm"].track_running_stats and fixed["inorm"].running_mean is None
    assert not fixed["sparse"].sparse
    assert _kinds(fdp.validate(fixed)) == {
        ("capped", WEIGHT_CHANGED_IN_FORWARD),
        ("spectral.parametrizations.weight.0", BUFFERS_CHANGE),
    }


def test_function_preserving_fixes_keep_outputs() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.TransformerEncoderLayer(4, 2, 8, batch_first=True)
            self.rnn = nn.LSTM(4, 3, batch_first=True, bidirectional=True)
            self.bag = nn.EmbeddingBag(6, 6, mode="max")
            self.bilinear = nn.Bilinear(6, 6, 2)

        def forward(self, x, tokens):
            out, _ = self.rnn(self.encoder(x))
            return self.bilinear(out[:, -1], self.bag(tokens))

    model = Net().eval()
    x, tokens = torch.randn(3, 5, 4), torch.randint(0, 6, (3, 4))
    fixed = fdp.fix(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(fixed(x, tokens), model(x, tokens), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- findings from a run


class SelfAttention(nn.Module):
    """Calls F.scaled_dot_product_attention directly: no module swap can fix it."""

    def __init__(self, attention=F.scaled_dot_product_attention) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 12)
        self.attention = attention

    def forward(self, x):
        heads = self.proj(x).unflatten(-1, (3, 2, 2)).movedim(-4, -2)  # [..., 3, heads, L, 2]
        q, k, v = heads.unbind(-4)
        return self.attention(q, k, v).transpose(-3, -2).flatten(-2)


def test_a_run_finds_fallbacks_in_custom_code_and_names_the_submodule() -> None:
    model = nn.Sequential(nn.Linear(4, 4), SelfAttention())
    x = torch.randn(3, 5, 4)
    assert fdp.validate(model) == []  # nothing to see from the types alone
    [finding] = fdp.validate(model, example_inputs=x)
    assert (finding.submodule, finding.kind, finding.fixable) == ("1", NO_BATCHING_RULE, False)
    assert "_scaled_dot_product" in finding.problem and "SelfAttention" in finding.problem
    assert "funcdp.nn.scaled_dot_product_attention" in finding.fix
    repaired = nn.Sequential(nn.Linear(4, 4), SelfAttention(fnn.scaled_dot_product_attention))
    assert fdp.validate(repaired, example_inputs=x) == []


class Counter(nn.Module):
    """Counts its calls in a buffer: state that changes in training."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x


class Branchy(nn.Module):
    """Data-dependent Python control flow: vmap cannot trace it."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else -x


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(2, 2)
        self.spare = nn.Linear(2, 2)
        self.frozen_spare = nn.Linear(2, 2).requires_grad_(False)

    def forward(self, x):
        return self.used(x)


def test_a_run_finds_changing_buffers_unused_parameters_and_vmap_errors() -> None:
    model = nn.ModuleDict({"count": Counter(), "parts": Unused()})

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner["parts"](self.inner["count"](x))

    wrapper = Wrapper()
    findings = fdp.validate(wrapper, example_inputs=torch.randn(3, 2))
    # The in-place update of the captured buffer also fails under vmap: both are reported.
    assert _kinds(findings) == {
        ("inner.count", BUFFERS_CHANGE),
        ("inner.count", VMAP_ERROR),
        ("inner.parts.spare", UNUSED_PARAMETER),
    }
    branchy = nn.Sequential(nn.Linear(2, 2), nn.Sequential(Branchy()))
    assert _kinds(fdp.validate(branchy, example_inputs=torch.randn(3, 2))) == {("1.0", VMAP_ERROR)}
    unused = [f for f in findings if f.kind == UNUSED_PARAMETER]
    assert {f.problem.split("'")[1] for f in unused} == {"weight", "bias"}
    assert float(wrapper.inner["count"].calls) == 0  # validate ran on copies


def test_check_supported_raises_naming_the_submodule_and_what_to_do() -> None:
    model = nn.Sequential(nn.Linear(2, 2), Branchy())
    with pytest.raises(UnsupportedModuleError) as info:
        check_supported(model, example_inputs=torch.randn(2, 2))
    message = str(info.value)
    assert "submodule '1'" in message and "Branchy fails under vmap(grad)" in message
    assert "no data-dependent Python control flow" in message
    assert isinstance(info.value, ValueError) and len(info.value.findings) == 1
    with pytest.raises(
        UnsupportedModuleError, match=r"submodule '0'.*funcdp.fix\(module\) does this"
    ):
        check_supported(nn.Sequential(nn.BatchNorm1d(2)))
    check_supported(nn.Sequential(nn.Linear(2, 2)), example_inputs=torch.randn(2, 2))


# ---------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout: stem, four stages of two BasicBlocks, pool, fc."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin, stages = [64, 128, 256, 512], 64, []
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1))
            )
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_resnet18_is_fixed_validated_and_trains_a_dp_step() -> None:
    torch.manual_seed(0)
    model = ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_181_642  # torchvision's, 10 classes
    findings = fdp.validate(model)
    assert len(findings) == 20 and {f.kind for f in findings} == {MIXES_EXAMPLES}
    with pytest.raises(ValueError, match="submodule 'bn1'"):
        fdp.functionalize(model)
    fixed, changes = fdp.fix(model, return_changes=True)
    assert len(changes) == 20 and {c.after for c in changes} == {
        "GroupNorm(32, 64)",
        "GroupNorm(32, 128)",
        "GroupNorm(32, 256)",
        "GroupNorm(32, 512)",
    }
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    assert fdp.validate(fixed, example_inputs=x[:2]) == []

    apply_fn, params, buffers = fdp.functionalize(fixed)

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])

    privatizer = fdp.chain(
        fdp.clip(max_norm=1.0),
        fdp.aggregate(),
        fdp.gaussian_noise(noise_multiplier=1.0),
        fdp.normalize(expected_batch_size=4),
        fdp.account(sample_rate=0.01),
    )
    optimizer = fdp.optim.sgd(learning_rate=0.1)
    step = fdp.make_train_step(loss_fn, privatizer, optimizer)
    state = fdp.TrainState.create(
        params, buffers=buffers, privatizer=privatizer, optimizer=optimizer, key=fdp.random.key(0)
    )
    new_state, metrics = step(state, fdp.Batch((x, y), torch.ones(4, dtype=torch.bool)))
    assert new_state.step == 1 and metrics["batch_size"] == 4 and not metrics["skipped"]
    assert all(torch.isfinite(p).all() for p in new_state.params.values())
    assert not torch.equal(new_state.params["fc.weight"], params["fc.weight"])
    assert new_state.ledger.records[0].steps == 1


# ------------------------------------------------- keyword inputs, whole messages
# (Hugging Face models: tests/test_hf_validate.py)


class _ItemInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        if x.sum().item() > 0:  # the line validate must name
            return self.lin(x)
        return -self.lin(x)


def test_an_item_in_forward_names_the_module_and_the_line_and_keeps_the_whole_message() -> None:
    [finding] = fdp.validate(nn.Sequential(_ItemInForward()), example_inputs=torch.randn(3, 2))
    assert finding.submodule == "0" and finding.kind == VMAP_ERROR
    line = next(
        i
        for i, text in enumerate(open(__file__).read().splitlines(), 1)
        if "the line validate" in text
    )
    assert f"test_validate.py:{line} in forward" in finding.problem
    assert finding.problem.count("For (3): please file an issue") == 1  # not cut
    assert ".item()" in finding.fix and "torch.where" in finding.fix


def test_keyword_inputs_reach_the_forward_by_name() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x, cache=None, scale=None):
            assert cache is None  # the mask must not land in the second positional slot
            return self.lin(x) * scale

    found = fdp.validate(
        TwoInputs(), example_kwargs={"x": torch.randn(3, 2), "scale": torch.ones(3, 1)}
    )
    assert _kinds(found) == {("unused", UNUSED_PARAMETER)}

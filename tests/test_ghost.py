"""Ghost clipping with book-keeping equals the vmap path on the model zoo, flat and per layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcdp as fdp
from funcdp.ghost import clipped_sum, ghost_clipped_sum
from funcdp.ghost.capture import plan

RTOL = 1e-5

# torch warns that an even kernel with padding="same" pads a copy; the Norms model does it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


# ----------------------------------------------------------------------------- the model zoo


class TextLSTM(nn.Module):
    def __init__(self, vocab=40, dim=12, hidden=16, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = fdp.nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


class Encoder(nn.Module):
    def __init__(self, vocab=30, dim=32, heads=4, layers=2, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 64, dropout=0.0, batch_first=True)
        self.layers = nn.ModuleList([fdp.fix(layer) for _ in range(layers)])
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


class Norms(nn.Module):
    """Conv1d ('same', even kernel), GroupNorm, LayerNorm, Conv3d (groups, dilation)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 4, padding="same")  # pads 1 left, 2 right
        self.gn = nn.GroupNorm(3, 6)
        self.ln = nn.LayerNorm(6 * 10)
        self.conv3 = nn.Conv3d(2, 4, 2, stride=(1, 2, 1), dilation=(2, 1, 1), groups=2, bias=False)
        self.head = nn.Linear(60 + 4 * 1 * 2 * 1, 3)

    def forward(self, x, v):
        a = self.ln(torch.tanh(self.gn(self.conv1(x))).flatten(1))
        b = torch.relu(self.conv3(v)).flatten(1)
        return self.head(torch.cat([a, b], 1))


class Tied(nn.Module):
    """A language-model head tied to the embedding: its two uses must be summed, then normed."""

    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embed(tokens)))).mean(1)


def _mlp():
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def _tokens(size, length, vocab, generator):
    tokens = torch.randint(0, vocab, (size, length), generator=generator)
    tokens[:, :3] = tokens[:, 3:6]  # repeated ids: the embedding's equality mask matters
    tokens[::2, -1] = 0  # the padding_idx of TextLSTM: no gradient for that row
    return tokens


def _zoo(name, size=6):
    """(module, inputs, number of classes); "bags" gives each example 3 rows of the model."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return _mlp(), (torch.randn(size, 64, generator=g),), 10
    if name == "cnn":
        return _cnn(), (torch.randn(size, 3, 32, 32, generator=g),), 10
    if name == "lstm":
        return TextLSTM(), (_tokens(size, 10, 40, g),), 3
    if name == "transformer":
        return Encoder(), (_tokens(size, 8, 30, g),), 3
    if name == "bags":
        inputs = (torch.randn(size, 3, 4, 10, generator=g), torch.randn(size, 3, 2, 3, 4, 2))
        return Norms(), inputs, 3
    if name == "norms":
        return (
            Norms(),
            (torch.randn(size, 4, 10, generator=g), torch.randn(size, 2, 3, 4, 2, generator=g)),
            3,
        )
    if name == "tied":
        return Tied(), (_tokens(size, 6, 20, g),), 20
    raise KeyError(name)


ZOO = ["mlp", "cnn", "lstm", "transformer", "norms", "bags", "tied"]


def _problem(name, garbage="nan"):
    """A zoo model's loss, parameters, batch and mask; padded rows hold `garbage`: NaN, or
    large finite values (which the sums must zero exactly, not by selection)."""
    module, inputs, classes = _zoo(name)
    apply_fn, params, buffers = fdp.functionalize(module)
    size = inputs[0].shape[0]
    labels = torch.randint(0, classes, (size,), generator=torch.Generator().manual_seed(2))

    def loss_fn(params, *example):
        *xs, y = example
        if name == "bags":  # the example is already a batch of 3 rows: one loss over them
            return F.cross_entropy(apply_fn(params, buffers, *xs), y.expand(3))
        logits = apply_fn(params, buffers, *(x[None] for x in xs))
        return F.cross_entropy(logits, y[None])

    mask = torch.ones(size, dtype=torch.bool)
    mask[[1, 4]] = False
    batch = tuple(x.clone() for x in inputs) + (labels,)
    for x in batch:  # padded rows hold garbage where the dtype allows it
        if x.is_floating_point():
            x[~mask] = float("nan") if garbage == "nan" else 1e3 * x[~mask] - 7.0
    return loss_fn, params, batch, mask


def _reference(loss_fn, params, batch, mask, clipper):
    """The vmap path: per-example gradients, the clipping transform, the masked sum."""
    grads = fdp.per_sample_grads(loss_fn)(params, *batch)
    clipped, _ = clipper.update(grads, clipper.init(params))
    summed, _ = fdp.aggregate().update(clipped, (), mask=mask)
    norms = fdp.tree.per_example_norms(grads)
    return summed, torch.where(mask, norms, 0.0)


def _assert_close_relative(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        assert torch.isfinite(a).all(), name
        error = torch.linalg.vector_norm(a - e)
        assert error <= RTOL * torch.linalg.vector_norm(e) + 1e-12, (name, float(error))


def _thresholds(params, scale):
    return {name: scale * (1 + i % 3) / len(params) ** 0.5 for i, name in enumerate(params)}


# ----------------------------------------------------------------------------- equality


# Every zoo model in the default plan; the conv models also with every conv on im2col.
CASES = [(name, "vmap") for name in ZOO] + [(name, "unfold") for name in ("cnn", "norms", "bags")]


@pytest.mark.parametrize("garbage", ["nan", "finite"])
@pytest.mark.parametrize(("name", "conv_explicit"), CASES)
def test_flat_clipping_equals_vmap(name, conv_explicit, garbage):
    loss_fn, params, batch, mask = _problem(name, garbage)
    limit = 0.3  # clips some examples, not all
    expected, norms = _reference(loss_fn, params, batch, mask, fdp.clip(limit))
    fn = ghost_clipped_sum(loss_fn, max_norm=limit, conv_explicit=conv_explicit)
    result = fn(params, *batch, mask=mask)
    _assert_close_relative(result.grads, expected)
    torch.testing.assert_close(result.norms, norms, rtol=RTOL, atol=0)
    assert (norms[mask] > limit).any() and (result.group_norms[~mask] == 0).all()


@pytest.mark.parametrize(("name", "conv_explicit"), CASES)
def test_per_layer_clipping_equals_vmap(name, conv_explicit):
    loss_fn, params, batch, mask = _problem(name)
    limits = _thresholds(params, 0.3)
    clipper = fdp.clip_per_layer(limits)
    expected, norms = _reference(loss_fn, params, batch, mask, clipper)
    names = tuple(sorted(limits))
    c = torch.tensor([limits[n] for n in names])
    fn = ghost_clipped_sum(
        loss_fn,
        factor_fn=lambda n: c / torch.maximum(n, c),
        groups=lambda n: n,
        group_names=names,
        conv_explicit=conv_explicit,
    )
    result = fn(params, *batch, mask=mask)
    _assert_close_relative(result.grads, expected)
    torch.testing.assert_close(result.norms, norms, rtol=RTOL, atol=0)
    grads = fdp.per_sample_grads(loss_fn)(params, *batch)
    group_norms, _ = fdp.transforms.clipping.grouped_norms(grads, lambda n: n, names)
    torch.testing.assert_close(
        result.group_norms, torch.where(mask[:, None], group_norms, 0.0), rtol=RTOL, atol=1e-9
    )


def test_grouped_factor_rule_by_module():
    """Groups of several parameters (one per top-level module) with automatic clipping."""
    loss_fn, params, batch, mask = _problem("transformer")
    top = lambda path: path.split(".")[0]  # noqa: E731
    clipper = fdp.normalize_per_example(
        None, 0.01, groups=top, group_norms={"embed": 1.0, "layers": 2.0, "head": 0.5}
    )
    expected, _ = _reference(loss_fn, params, batch, mask, clipper)
    radii = torch.tensor([1.0, 0.5, 2.0])  # sorted names: embed, head, layers
    fn = ghost_clipped_sum(loss_fn, factor_fn=lambda n: radii / (n + 0.01), groups=top)
    _assert_close_relative(fn(params, *batch, mask=mask).grads, expected)


def test_losses_are_the_per_example_losses():
    loss_fn, params, batch, mask = _problem("cnn")
    result = ghost_clipped_sum(loss_fn, max_norm=1.0)(params, *batch, mask=mask)
    losses = torch.func.vmap(loss_fn, in_dims=(None,) + (0,) * len(batch))(params, *batch)
    torch.testing.assert_close(result.losses[mask], losses[mask])


def test_clipped_sum_ghost_mode_equals_vmap_mode():
    loss_fn, params, batch, mask = _problem("lstm")
    automatic = fdp.clip_by(lambda n: 0.5 / (n + 0.01), 0.5)
    with_buffers = lambda p, buffers, *example: loss_fn(p, *example)  # noqa: E731
    ghost = fdp.clipped_sum(with_buffers, clipping=automatic, mode="ghost")
    vmapped = fdp.clipped_sum(with_buffers, clipping=automatic)
    ghost, vmapped = (fn(params, {}, *batch, mask=mask) for fn in (ghost, vmapped))
    _assert_close_relative(ghost.grads, vmapped.grads)
    torch.testing.assert_close(ghost.norms, vmapped.norms, rtol=RTOL, atol=0)


def test_zero_nonfinite_drops_a_real_example_with_nan():
    loss_fn, params, batch, mask = _problem("cnn")
    batch[0][0] = float("nan")  # row 0 is real
    without = mask.clone()
    without[0] = False
    expected, _ = _reference(loss_fn, params, batch, without, fdp.clip(0.3))
    result = ghost_clipped_sum(loss_fn, max_norm=0.3, zero_nonfinite=True)(
        params, *batch, mask=mask
    )
    _assert_close_relative(result.grads, expected)
    assert result.norms[0].isnan() and result.norms[without].isfinite().all()
    poisoned = ghost_clipped_sum(loss_fn, max_norm=0.3)(params, *batch, mask=mask)
    assert not all(g.isfinite().all() for g in poisoned.grads.values())


@pytest.mark.parametrize(("garbage", "passes"), [("finite", 1), ("nan", 2)])
def test_padded_rows_are_selected_away_only_when_they_hold_inf_or_nan(garbage, passes, monkeypatch):
    loss_fn, params, batch, mask = _problem("mlp", garbage)
    calls = []
    shares = clipped_sum._shares
    monkeypatch.setattr(clipped_sum, "_shares", lambda *args: calls.append(1) or shares(*args))
    result = ghost_clipped_sum(loss_fn, max_norm=0.3)(params, *batch, mask=mask)
    expected, _ = _reference(loss_fn, params, batch, mask, fdp.clip(0.3))
    _assert_close_relative(result.grads, expected)
    assert len(calls) == passes


@pytest.mark.parametrize("name", ["cnn", "transformer", "norms", "lstm"])
def test_a_bf16_autocast_loss_gives_a_float32_sum_near_the_float32_one(name):
    loss_fn, params, batch, mask = _problem(name, "finite")

    def half_loss(params, *example):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(params, *example).float()

    want = ghost_clipped_sum(loss_fn, max_norm=0.3)(params, *batch, mask=mask)
    got = ghost_clipped_sum(half_loss, max_norm=0.3)(params, *batch, mask=mask)
    assert all(g.dtype == torch.float32 for g in got.grads.values())
    flat = lambda tree: torch.cat([t.reshape(-1) for t in tree.values()])  # noqa: E731
    error = torch.linalg.vector_norm(flat(got.grads) - flat(want.grads))
    assert 0 < error <= 0.05 * torch.linalg.vector_norm(flat(want.grads))  # bf16: 8-bit mantissa
    torch.testing.assert_close(got.norms, want.norms, rtol=0.05, atol=0)


def test_auto_chunks_size_the_fallback_gradients_only(monkeypatch):
    asked = []

    def spy(*args, **kwargs):
        asked.append((args[1], original(*args, **kwargs)))
        return asked[-1][1]

    original = clipped_sum.examples_in_budget
    monkeypatch.setattr(clipped_sum, "examples_in_budget", spy)
    tiny = fdp.AutoChunk(budget_bytes=1)  # one example per chunk
    for name, fallback in (("mlp", False), ("lstm", True)):
        loss_fn, params, batch, mask = _problem(name, "finite")
        whole = ghost_clipped_sum(loss_fn, max_norm=0.3)(params, *batch, mask=mask)
        fn = ghost_clipped_sum(loss_fn, max_norm=0.3, chunk_size=tiny)
        for _ in range(2):  # sized once per example signature
            _assert_close_relative(fn(params, *batch, mask=mask).grads, whole.grads)
        fn(params, *(x[:3] for x in batch), mask=mask[:3])  # another batch size: not again
        if fallback:  # the budget covered the fallback parameters, not the ghost ones
            ((measured, chunk),) = asked
            assert set(measured) == set(plan(loss_fn, params, batch).fallback) and chunk == 1
        else:  # nothing per-example is formed: no chunk to size
            assert asked == []


def test_chunked_vmap_gives_the_same_sum():
    loss_fn, params, batch, mask = _problem("mlp")
    whole = ghost_clipped_sum(loss_fn, max_norm=0.3)(params, *batch, mask=mask)
    chunked = ghost_clipped_sum(loss_fn, max_norm=0.3, chunk_size=4)(params, *batch, mask=mask)
    _assert_close_relative(chunked.grads, whole.grads)


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    ("name", "fallback"),
    [
        ("mlp", set()),
        ("cnn", set()),
        ("norms", set()),
        ("bags", set()),
        # the recurrent weights are used at every step; weight_ih once, in a linear
        ("lstm", {"lstm.weight_hh_l0", "lstm.bias_hh_l0"}),
        # funcdp's self-attention applies each projection as one linear op
        ("transformer", set()),
        ("tied", set()),  # an embedding tied to its output layer: funcdp.ghost.tied
    ],
)
def test_plan_taps_supported_ops_and_falls_back_elsewhere(name, fallback):
    loss_fn, params, batch, _ = _problem(name)
    result = plan(loss_fn, params, batch, conv_explicit="unfold")
    assert set(result.fallback) == fallback
    assert result.ghost == set(params) - fallback


def test_mixed_plan_sends_convs_with_many_positions_to_vmap():
    """2 T^2 >= p d: the explicit gradient is cheaper, vmap's conv backward forms it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),  # T = 30 * 30 = 900, p d = 8 * 27: explicit
        nn.ReLU(),
        nn.Conv2d(8, 32, 3, stride=8),  # T = 4 * 4 = 16, p d = 32 * 72: ghost norm
        nn.Flatten(),
        nn.Linear(32 * 16, 4),
    )
    apply_fn, params, _ = fdp.functionalize(model)

    def loss_fn(params, x, y):
        return F.cross_entropy(apply_fn(params, {}, x[None]), y[None])

    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    mask = torch.tensor([True, True, False, True])
    assert set(plan(loss_fn, params, batch).fallback) == {"0.weight", "0.bias"}
    expected, norms = _reference(loss_fn, params, batch, mask, fdp.clip(0.3))
    result = ghost_clipped_sum(loss_fn, max_norm=0.3)(params, *batch, mask=mask)
    _assert_close_relative(result.grads, expected)
    torch.testing.assert_close(result.norms, norms, rtol=RTOL, atol=0)


def test_a_parameter_the_loss_reads_falls_back():
    loss_fn, params, batch, mask = _problem("mlp")

    def regularized(params, *example):
        return loss_fn(params, *example) + 0.1 * params["2.weight"].square().sum()

    assert plan(regularized, params, batch).fallback == ("2.weight",)
    expected, _ = _reference(regularized, params, batch, mask, fdp.clip(0.3))
    result = ghost_clipped_sum(regularized, max_norm=0.3)(params, *batch, mask=mask)
    _assert_close_relative(result.grads, expected)


@settings(max_examples=12)
@given(
    positions=st.integers(1, 12),
    features=st.integers(1, 9),
    outputs=st.integers(1, 9),
    bias=st.booleans(),
)
def test_linear_norms_match_on_both_sides_of_the_gram_switch(positions, features, outputs, bias):
    """Ghost norm (2 T^2 < p d) and explicit norm (otherwise) both equal the vmap norms."""
    torch.manual_seed(positions * 100 + features * 10 + outputs)
    module = nn.Linear(features, outputs, bias=bias)
    apply_fn, params, _ = fdp.functionalize(module)
    x = torch.randn(3, positions, features)

    def loss_fn(params, x):
        return apply_fn(params, {}, x).sin().sum()

    norms = fdp.per_sample_norms(loss_fn)(params, x)
    result = ghost_clipped_sum(loss_fn, max_norm=1.0)(params, x)
    assert plan(loss_fn, params, (x,)).fallback == ()
    torch.testing.assert_close(result.norms, norms, rtol=RTOL, atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(
    nd=st.integers(1, 2),
    channels=st.integers(1, 4),
    out_per_group=st.integers(1, 3),
    groups=st.integers(1, 2),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same"]),
    size=st.integers(5, 9),  # at least the widest dilated kernel, 2 * (3 - 1) + 1
    conv_explicit=st.sampled_from(["vmap", "unfold"]),
)
def test_conv_sums_match_vmap_for_any_geometry(
    nd, channels, out_per_group, groups, kernel, stride, dilation, padding, size, conv_explicit
):
    """Whichever way the plan takes a conv (ghost norm, im2col, vmap fallback), the clipped sum
    and the norms equal the vmap path's."""
    if padding == "same":
        stride = 1  # torch allows "same" only with stride 1
    torch.manual_seed(nd * 1000 + channels * 100 + kernel * 10 + size)
    conv = (nn.Conv1d, nn.Conv2d)[nd - 1](
        channels * groups,
        out_per_group * groups,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    apply_fn, params, _ = fdp.functionalize(conv)
    x = torch.randn(4, channels * groups, *(size,) * nd)

    def loss_fn(params, x):
        return apply_fn(params, {}, x[None]).sin().sum()

    expected, norms = _reference(
        loss_fn, params, (x,), torch.ones(4, dtype=torch.bool), fdp.clip(0.5)
    )
    result = ghost_clipped_sum(loss_fn, max_norm=0.5, conv_explicit=conv_explicit)(params, x)
    _assert_close_relative(result.grads, expected)
    torch.testing.assert_close(result.norms, norms, rtol=RTOL, atol=1e-7)


# ----------------------------------------------------------------------------- errors


def test_a_forward_that_changes_path_is_refused():
    loss_fn, params, batch, _ = _problem("mlp")
    calls = []

    def changing(params, x, y):
        calls.append(1)
        if len(calls) > 1:  # the probe sees the full model, the train pass skips a layer
            params = {**params, "4.weight": params["4.weight"] * 1.0}
        return loss_fn(params, x, y)

    with pytest.raises(RuntimeError, match="probe saw") as raised:
        ghost_clipped_sum(changing, max_norm=1.0)(params, *batch)
    assert 'Performance(mode="vmap") takes it' in str(raised.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of max_norm and factor_fn"),
        ({"max_norm": 1.0, "factor_fn": lambda n: n}, "exactly one of max_norm and factor_fn"),
        ({"max_norm": 0.0}, r"max_norm must be a finite number > 0, got 0.0"),
        ({"max_norm": 1.0, "groups": lambda n: n}, "pass factor_fn for grouped clipping"),
        ({"max_norm": 1.0, "chunk_size": 0}, "chunk_size must be a positive int or None, got 0"),
        ({"max_norm": 1.0, "conv_explicit": "im2col"}, 'conv_explicit must be "vmap" or "unfold"'),
    ],
)
def test_bad_arguments_are_refused_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ghost_clipped_sum(lambda p, x: x.sum(), **kwargs)


def test_bad_groups_factors_and_mask_are_refused_when_called():
    loss_fn, params, batch, _ = _problem("mlp")
    with pytest.raises(ValueError, match="'0.weight' is in group '0', which is not one of"):
        ghost_clipped_sum(
            loss_fn, factor_fn=lambda n: n, groups=lambda n: n[0], group_names=("2", "4")
        )(params, *batch)
    with pytest.raises(ValueError, match=r"factor_fn must return a tensor of shape \(6, 1\)"):
        ghost_clipped_sum(loss_fn, factor_fn=lambda n: n[:3])(params, *batch)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor, got a torch.float32 tensor"):
        ghost_clipped_sum(loss_fn, max_norm=1.0)(params, *batch, mask=torch.ones(6))
    with pytest.raises(ValueError, match=r"mask must have shape \(6,\) to fit a batch of 6 rows"):
        ghost_clipped_sum(loss_fn, max_norm=1.0)(params, *batch, mask=torch.ones(5, dtype=bool))
    with pytest.raises(ValueError, match="at least one row"):
        ghost_clipped_sum(loss_fn, max_norm=1.0)(params, *(x[:0] for x in batch))

"""funcdp.nn.LSTM / GRU / RNN: torch's math and state_dict, and vmap without fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import pack_padded_sequence

import funcdp.nn as fnn

FALLBACK = r".*performance drop because we have not yet implemented the batching rule.*"
KINDS = [
    (nn.LSTM, fnn.LSTM, {}),
    (nn.LSTM, fnn.LSTM, {"proj_size": 2}),
    (nn.GRU, fnn.GRU, {}),
    (nn.RNN, fnn.RNN, {"nonlinearity": "tanh"}),
    (nn.RNN, fnn.RNN, {"nonlinearity": "relu"}),
]
KIND_IDS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _pair(kind, **config):
    torch_cls, ours_cls, extra = kind
    reference = torch_cls(**config, **extra)
    ours = ours_cls(**config, **extra)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _flat(hidden):
    return hidden if isinstance(hidden, tuple) else (hidden,)


configs = st.fixed_dictionaries(
    {
        "input_size": st.integers(1, 4),
        "hidden_size": st.integers(3, 5),
        "num_layers": st.integers(1, 3),
        "bias": st.booleans(),
        "batch_first": st.booleans(),
        "bidirectional": st.booleans(),
    }
)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@settings(max_examples=12, derandomize=True, deadline=None)
@given(config=configs, batch=st.integers(1, 3), steps=st.integers(1, 5), with_hx=st.booleans())
def test_matches_torch_outputs_states_and_gradients(kind, config, batch, steps, with_hx) -> None:
    torch.manual_seed(0)
    reference, ours = _pair(kind, **config)
    shape = (batch, steps) if config["batch_first"] else (steps, batch)
    x = torch.randn(*shape, config["input_size"], requires_grad=True)
    hx = None
    if with_hx:
        layers = config["num_layers"] * (2 if config["bidirectional"] else 1)
        h0 = torch.randn(layers, batch, reference.proj_size or config["hidden_size"])
        hx = (h0, torch.randn(layers, batch, config["hidden_size"])) if kind[0] is nn.LSTM else h0
    want_out, want_hidden = reference(x, hx)
    got_out, got_hidden = ours(x, hx)
    torch.testing.assert_close(got_out, want_out, **TOL)
    torch.testing.assert_close(_flat(got_hidden), _flat(want_hidden), **TOL)
    weights = torch.randn_like(want_out)
    want = torch.autograd.grad((want_out * weights).sum(), [x, *reference.parameters()])
    got = torch.autograd.grad((got_out * weights).sum(), [x, *ours.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_state_dict_keys_match_and_checkpoints_load_both_ways(kind) -> None:
    config = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    reference, ours = _pair(kind, **config)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert "weight_hh_l1_reverse" in ours.state_dict()
    other = kind[0](**config, **kind[2])
    other.load_state_dict(ours.state_dict())  # strict: same keys and shapes
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours(x)[0], other(x)[0], **TOL)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequences_match_torch(kind, enforce_sorted) -> None:
    torch.manual_seed(1)
    reference, ours = _pair(kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    lengths = torch.tensor([5, 3, 2, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 3])
    x = torch.randn(5, 4, 3)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    want_out, want_hidden = reference(packed)
    got_out, got_hidden = ours(packed)
    torch.testing.assert_close(got_out.data, want_out.data, **TOL)
    assert torch.equal(got_out.batch_sizes, want_out.batch_sizes)
    for got, want in [(got_out.sorted_indices, want_out.sorted_indices),
                      (got_out.unsorted_indices, want_out.unsorted_indices)]:  # fmt: skip
        assert (got is None and want is None) or torch.equal(got, want)
    torch.testing.assert_close(_flat(got_hidden), _flat(want_hidden), **TOL)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_lengths_argument_equals_packing_and_zeroes_padding(kind) -> None:
    torch.manual_seed(2)
    reference, ours = _pair(
        kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=True
    )
    lengths = torch.tensor([2, 5, 1])
    x = torch.randn(3, 5, 3)
    want_packed, want_hidden = reference(pack_padded_sequence(x, lengths, True, False))
    want_out, _ = nn.utils.rnn.pad_packed_sequence(want_packed, batch_first=True)
    got_out, got_hidden = ours(x, lengths=lengths)
    torch.testing.assert_close(got_out, want_out, **TOL)
    torch.testing.assert_close(_flat(got_hidden), _flat(want_hidden), **TOL)
    assert got_out[0, 2:].abs().max() == 0 and got_out[2, 1:].abs().max() == 0


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_unbatched_input_and_no_grad_path_match_torch(kind) -> None:
    torch.manual_seed(3)
    reference, ours = _pair(kind, input_size=2, hidden_size=3, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2)
    with torch.no_grad():
        want_out, want_hidden = reference(x)
        got_out, got_hidden = ours(x)
    assert got_out.shape == want_out.shape == (4, 2 * (reference.proj_size or 3))
    torch.testing.assert_close(got_out, want_out, **TOL)
    torch.testing.assert_close(_flat(got_hidden), _flat(want_hidden), **TOL)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_dropout_between_layers_only(kind) -> None:
    """With dropout=1 the second layer sees zeros: same as torch, and the last layer is kept."""
    torch.manual_seed(4)
    reference, ours = _pair(kind, input_size=2, hidden_size=3, num_layers=2, dropout=1.0)
    x = torch.randn(4, 2, 2)
    torch.testing.assert_close(ours.train()(x)[0], reference.train()(x)[0], **TOL)
    second = kind[0](input_size=reference.proj_size or 3, hidden_size=3, **kind[2])
    second.load_state_dict(
        {k.replace("_l1", "_l0"): v for k, v in ours.state_dict().items() if "_l1" in k}
    )
    torch.testing.assert_close(ours(x)[0], second(torch.zeros(4, 2, second.input_size))[0], **TOL)
    eval_out = ours.eval()(x)[0]
    torch.testing.assert_close(eval_out, reference.eval()(x)[0], **TOL)
    assert not torch.allclose(eval_out, ours.train()(x)[0])


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_per_example_grads_with_lengths_equal_a_loop_on_truncated_sequences(kind) -> None:
    torch.manual_seed(5)
    _, model = _pair(
        kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=True
    )
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, lengths = torch.randn(4, 6, 3), torch.tensor([6, 1, 4, 3])

    def loss(params, x, length):
        out, hidden = functional_call(model, params, (x[None],), {"lengths": length[None]})
        return out.pow(2).sum() + _flat(hidden)[0].sin().sum()

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=FALLBACK, category=UserWarning)
        got = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, lengths)
    for i, length in enumerate(lengths.tolist()):
        out, hidden = model(x[i : i + 1, :length])
        grads = torch.autograd.grad(
            out.pow(2).sum() + _flat(hidden)[0].sin().sum(), list(model.parameters())
        )
        for (name, _), g in zip(model.named_parameters(), grads, strict=True):
            torch.testing.assert_close(got[name][i], g, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_from_torch_copies_weights_config_mode_and_frozen_flags(kind) -> None:
    reference = kind[0](
        3, 4, num_layers=2, batch_first=True, dropout=0.5, bias=False, **kind[2]
    ).eval()
    reference.weight_ih_l0.requires_grad_(False)
    ours = type(_pair(kind, input_size=1, hidden_size=3)[1]).from_torch(reference)
    assert type(ours) is kind[1] and not ours.training
    assert (ours.batch_first, ours.dropout, ours.bias, ours.num_layers) == (True, 0.5, False, 2)
    assert not ours.weight_ih_l0.requires_grad and ours.weight_hh_l0.requires_grad
    x = torch.randn(2, 3, 3)
    torch.testing.assert_close(ours(x)[0], reference(x)[0], **TOL)


def test_bad_arguments_name_what_is_wrong() -> None:
    lstm = fnn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"hx \(h_0\) must have shape \(1, 2, 4\)"):
        lstm(x, (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))
    with pytest.raises(ValueError, match="LSTM hx must be a tuple"):
        lstm(x, torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        lstm(x, lengths=torch.tensor([5, 4, 3]))
    with pytest.raises(ValueError, match="input must be 2-D"):
        lstm(torch.randn(5, 2, 3, 1))
    packed = pack_padded_sequence(x, torch.tensor([5, 4]))
    with pytest.raises(ValueError, match="either a PackedSequence or lengths"):
        lstm(packed, lengths=torch.tensor([5, 4]))


def test_vmap_of_grad_runs_each_time_loop_once_for_the_whole_batch(monkeypatch) -> None:
    """Under vmap(grad) the forward and the backward loop each run once per direction, on all rows."""
    import funcdp.nn.recurrence as recurrence

    rows = {"forward": [], "backward": []}
    forward, backward = recurrence._forward_loop, recurrence._backward_loop

    def count(name, loop):
        return lambda *a: rows[name].append(a[3].shape[0]) or loop(*a)

    monkeypatch.setattr(recurrence, "_forward_loop", count("forward", forward))
    monkeypatch.setattr(recurrence, "_backward_loop", count("backward", backward))
    model = fnn.LSTM(2, 3, batch_first=True, bidirectional=True, proj_size=2)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(params, x):
        return functional_call(model, params, (x[None],))[0].sum()

    vmap(grad(loss), in_dims=(None, 0))(params, torch.randn(5, 4, 2))
    assert rows == {"forward": [5, 5], "backward": [5, 5]}  # two directions, five examples each


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_vmap_over_parameters_matches_a_loop(kind) -> None:
    """Weights that differ along the vmapped dimension (an ensemble) take the per-element path."""
    torch.manual_seed(0)
    models = [_pair(kind, input_size=2, hidden_size=3, batch_first=True)[1] for _ in range(3)]
    stacked = {n: torch.stack([m.get_parameter(n).detach() for m in models]) for n, _ in
               models[0].named_parameters()}  # fmt: skip
    x = torch.randn(3, 2, 4, 2)

    def loss(params, x):
        return functional_call(models[0], params, (x,))[0].pow(2).sum()

    got = vmap(grad(loss))(stacked, x)
    for b, model in enumerate(models):
        params = {n: p.detach() for n, p in model.named_parameters()}
        expected = grad(loss)(params, x[b])
        for name in params:
            torch.testing.assert_close(got[name][b], expected[name], **TOL)


def test_second_derivatives_are_refused() -> None:
    model = fnn.GRU(2, 3)
    x = torch.randn(4, 1, 2, requires_grad=True)
    (first,) = torch.autograd.grad(model(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        first.sum().backward()


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_autocast_input_projection_keeps_the_loop_in_float32(kind) -> None:
    """Under bfloat16 autocast the per-example gradients stay close to float32's."""
    torch.manual_seed(0)
    model = _pair(kind, input_size=8, hidden_size=6, batch_first=True)[1]
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(4, 5, 8)

    def loss(params, x, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = functional_call(model, params, (x[None],))[0]
        assert out.dtype == torch.float32
        return out.pow(2).sum()

    low = vmap(grad(loss), in_dims=(None, 0, None))(params, x, True)
    full = vmap(grad(loss), in_dims=(None, 0, None))(params, x, False)
    for name in params:
        scale = full[name].abs().max()
        assert (low[name] - full[name]).abs().max() <= 2e-2 * scale, name

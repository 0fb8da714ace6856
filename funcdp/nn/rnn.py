"""`RNN`, `LSTM` and `GRU` written with plain tensor ops, so `vmap` batches them.

They subclass `torch.nn.RNN`/`LSTM`/`GRU` and replace only `forward`: constructor, parameter
names (`weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`, `weight_hr_l0`, `..._reverse`),
initialization and `state_dict` are torch's, so a checkpoint loads either way. The math follows
torch's documentation (gate order i, f, g, o for LSTM and r, z, n for GRU).

torch's own recurrent kernels do not batch under `vmap` (on CPU, LSTM calls `mkldnn_rnn_layer`,
which has no batching rule, and falls back to a slow per-example loop; GRU and RNN fail with a
shape error). Here each time step is a handful of batched ops. The recurrent weight is used with
its gradient cut inside the time loop and re-attached once through a zero-valued term
`H_prev @ (W - W.detach())^T` over all steps, so its per-example gradient is one batched matmul
over the sequence instead of one outer product per step (this costs one extra forward pass
without gradient, to know `H_prev`). First derivatives are exact; derivatives of second order
through the recurrent weights are not (use torch's layers for those).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

Tensor = torch.Tensor
Cell = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


def _lstm_cell(gates: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    del h
    # chunk (one split) rather than slices: its backward is one cat, not four zero-filled buffers.
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _tanh_cell(gates: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    del h
    return torch.tanh(gates), c


def _relu_cell(gates: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    del h
    return torch.relu(gates), c


_CELLS: dict[str, Cell] = {"LSTM": _lstm_cell, "RNN_TANH": _tanh_cell, "RNN_RELU": _relu_cell}


def _scan(
    mode: str,
    x_part: Tensor,
    state: tuple[Tensor, Tensor | None],
    weights: tuple[Tensor, Tensor | None, Tensor | None],
    valid: Tensor | None,
    reverse: bool,
    carriers: tuple[Tensor | None, Tensor | None] = (None, None),
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor], list[Tensor]]:
    """Runs one direction of one layer over time.

    Args:
      mode: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU".
      x_part: the input projection `x @ W_ih^T + b_ih` for all steps, [N, T, G*H].
      state: (h_0, c_0), c_0 None except for LSTM.
      weights: (W_hh, b_hh, W_hr) as used inside the loop.
      valid: bool [N, T, 1] marking the steps within each sequence's length, or None.
      reverse: run from the last step to the first.
      carriers: per-step terms [N, T, *] added to the recurrent projection and to the LSTM
        output projection (the zero-valued gradient carriers), or None.

    Returns:
      outputs [N, T, H_out] (zero past a sequence's length), h_T, c_T, and per step (in time
      order) the h_{t-1} the step read and the unprojected LSTM output m_t.
    """
    w_hh, b_hh, w_hr = weights
    h, c = state
    steps = x_part.shape[1]
    # One unbind per sequence: indexing step by step would make autograd build a full-size
    # zero gradient for every step.
    x_steps = x_part.unbind(1)
    carrier_hh = None if carriers[0] is None else carriers[0].unbind(1)
    carrier_hr = None if carriers[1] is None else carriers[1].unbind(1)
    valid_steps = None if valid is None else valid.unbind(1)
    outputs: list[Tensor] = [x_part] * steps
    previous: list[Tensor] = [x_part] * steps
    unprojected: list[Tensor] = [x_part] * steps
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        previous[t] = h
        hh = F.linear(h, w_hh, b_hh)
        if carrier_hh is not None:
            hh = hh + carrier_hh[t]
        x_t = x_steps[t]
        if mode == "GRU":
            x_r, x_z, x_n = x_t.chunk(3, -1)
            h_r, h_z, h_n = hh.chunk(3, -1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            m, c_new = n + z * (h - n), None
        else:
            m, c_new = _CELLS[mode](x_t + hh, h, c)
        unprojected[t] = m
        h_new = m
        if w_hr is not None:
            h_new = F.linear(m, w_hr)
            if carrier_hr is not None:
                h_new = h_new + carrier_hr[t]
        if valid is not None:
            v = valid_steps[t]
            h_new = torch.where(v, h_new, h)
            c_new = None if c is None else torch.where(v, c_new, c)
            outputs[t] = torch.where(v, h_new, torch.zeros_like(h_new))
        else:
            outputs[t] = h_new
        h, c = h_new, c_new
    return torch.stack(outputs, 1), h, c, previous, unprojected


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _carrier(inputs: list[Tensor], weight: Tensor, bias: Tensor | None) -> Tensor:
    """`inputs @ (W - W.detach())^T (+ b - b.detach())`: zero, with the gradient of W (and b)."""
    zero_bias = None if bias is None else bias - bias.detach()
    return F.linear(torch.stack(inputs, 1), weight - weight.detach(), zero_bias)


def _direction(
    module: nn.RNNBase,
    name: str,
    x: Tensor,
    state: tuple[Tensor, Tensor | None],
    valid: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one layer (`name` is e.g. "l0" or "l1_reverse")."""
    mode, reverse = module.mode, name.endswith("_reverse")
    b_ih = getattr(module, f"bias_ih_{name}") if module.bias else None
    b_hh = getattr(module, f"bias_hh_{name}") if module.bias else None
    w_hh = getattr(module, f"weight_hh_{name}")
    w_hr = getattr(module, f"weight_hr_{name}") if module.proj_size > 0 else None
    x_part = F.linear(x, getattr(module, f"weight_ih_{name}"), b_ih)
    weights = (w_hh, b_hh, w_hr)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in weights)):
        return _scan(mode, x_part, state, weights, valid, reverse)[:3]
    with torch.no_grad():
        _, _, _, previous, unprojected = _scan(mode, x_part, state, weights, valid, reverse)
    carrier_hh = _carrier(previous, w_hh, b_hh)
    carrier_hr = None if w_hr is None else _carrier(unprojected, w_hr, None)
    if mode != "GRU":  # the recurrent term enters the gates additively: add it once, outside
        x_part, carrier_hh = x_part + carrier_hh, None
    detached = (w_hh.detach(), _detach(b_hh), _detach(w_hr))
    out = _scan(mode, x_part, state, detached, valid, reverse, (carrier_hh, carrier_hr))
    return out[:3]


def _forward(
    module: nn.RNNBase,
    input: Tensor | PackedSequence,
    hx: Tensor | tuple[Tensor, Tensor] | None,
    lengths: Tensor | None,
) -> tuple[Tensor | PackedSequence, Tensor | tuple[Tensor, Tensor]]:
    packed = input if isinstance(input, PackedSequence) else None
    if packed is not None:
        if lengths is not None:
            raise ValueError("pass either a PackedSequence or lengths, not both")
        input, lengths = pad_packed_sequence(packed, batch_first=True)
        batch_first, batched = True, True
    else:
        batch_first, batched = module.batch_first, input.dim() == 3
        if input.dim() not in (2, 3):
            raise ValueError(
                f"input must be 2-D (unbatched) or 3-D, got shape {tuple(input.shape)}"
            )
        if not batched:  # [T, F] -> [1, T, F]
            input = input.unsqueeze(0)
            hx = None if hx is None else _map_state(hx, lambda s: s.unsqueeze(1))
        elif not batch_first:
            input = input.transpose(0, 1)
    x = input  # [N, T, F]
    batch, steps = x.shape[0], x.shape[1]
    valid = None
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=x.device)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
        valid = (torch.arange(steps, device=x.device) < lengths.unsqueeze(-1)).unsqueeze(-1)
    h0, c0 = _initial_state(module, hx, x)
    directions = ("", "_reverse") if module.bidirectional else ("",)
    last_h, last_c = [], []
    for layer in range(module.num_layers):
        outs = []
        for d, suffix in enumerate(directions):
            index = layer * len(directions) + d
            state = (h0[index], None if c0 is None else c0[index])
            out, h, c = _direction(module, f"l{layer}{suffix}", x, state, valid)
            outs.append(out)
            last_h.append(h)
            last_c.append(c)
        x = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        if module.dropout and module.training and layer < module.num_layers - 1:
            x = F.dropout(x, module.dropout, training=True)
    h_n = torch.stack(last_h, 0)
    hidden = h_n if c0 is None else (h_n, torch.stack(last_c, 0))
    if packed is not None:
        sorted_ok = packed.sorted_indices is not None
        out = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=not sorted_ok)
        return out, hidden
    if not batched:
        return x.squeeze(0), _map_state(hidden, lambda s: s.squeeze(1))
    return (x if batch_first else x.transpose(0, 1)), hidden


def _initial_state(module: nn.RNNBase, hx, x: Tensor) -> tuple[Tensor, Tensor | None]:
    count = module.num_layers * (2 if module.bidirectional else 1)
    out_size = module.proj_size or module.hidden_size
    is_lstm = module.mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(count, x.shape[0], out_size)
        return h0, (x.new_zeros(count, x.shape[0], module.hidden_size) if is_lstm else None)
    if is_lstm:
        if not isinstance(hx, tuple) or len(hx) != 2:
            raise ValueError("LSTM hx must be a tuple (h_0, c_0)")
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    expected = (count, x.shape[0], out_size)
    if tuple(h0.shape) != expected:
        raise ValueError(f"hx (h_0) must have shape {expected}, got {tuple(h0.shape)}")
    if c0 is not None and tuple(c0.shape) != (count, x.shape[0], module.hidden_size):
        raise ValueError(
            f"c_0 must have shape {(count, x.shape[0], module.hidden_size)}, got {tuple(c0.shape)}"
        )
    return h0, c0


def _map_state(state, fn):
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


def _config(module: nn.RNNBase) -> dict:
    return dict(
        num_layers=module.num_layers,
        bias=module.bias,
        batch_first=module.batch_first,
        dropout=module.dropout,
        bidirectional=module.bidirectional,
    )


def _convert(cls: type[nn.RNNBase], module: nn.RNNBase, **extra) -> nn.RNNBase:
    reference = next(module.parameters())
    new = cls(
        module.input_size,
        module.hidden_size,
        **_config(module),
        **extra,
        device=reference.device,
        dtype=reference.dtype,
    )
    new.load_state_dict(module.state_dict())
    for name, p in module.named_parameters():
        new.get_parameter(name).requires_grad_(p.requires_grad)
    return new.train(module.training)


class LSTM(nn.LSTM):
    """`torch.nn.LSTM` with a forward that `vmap` batches; same arguments and `state_dict`.

    `forward(input, hx=None, lengths=None)`: `input` is a tensor ([T, N, F], [N, T, F] with
    `batch_first`, or unbatched [T, F]) or a `PackedSequence`. `lengths` ([N] ints) marks the
    valid steps of each sequence, as packing does: steps past a sequence's length leave its
    state unchanged, produce zero outputs, and the reverse direction starts at its last valid
    step. Returns `(output, (h_n, c_n))` as torch does.
    """

    def forward(self, input, hx=None, lengths=None):  # noqa: D102
        return _forward(self, input, hx, lengths)

    @classmethod
    def from_torch(cls, module: nn.LSTM) -> LSTM:
        """A copy of a `torch.nn.LSTM` as a funcdp `LSTM` (same weights, config and mode)."""
        return _convert(cls, module, proj_size=module.proj_size)


class GRU(nn.GRU):
    """`torch.nn.GRU` with a forward that `vmap` batches; same arguments and `state_dict`.

    `forward(input, hx=None, lengths=None)` as for `funcdp.nn.LSTM`; returns `(output, h_n)`.
    """

    def forward(self, input, hx=None, lengths=None):  # noqa: D102
        return _forward(self, input, hx, lengths)

    @classmethod
    def from_torch(cls, module: nn.GRU) -> GRU:
        """A copy of a `torch.nn.GRU` as a funcdp `GRU` (same weights, config and mode)."""
        return _convert(cls, module)


class RNN(nn.RNN):
    """`torch.nn.RNN` (tanh or relu) with a forward that `vmap` batches; same `state_dict`.

    `forward(input, hx=None, lengths=None)` as for `funcdp.nn.LSTM`; returns `(output, h_n)`.
    """

    def forward(self, input, hx=None, lengths=None):  # noqa: D102
        return _forward(self, input, hx, lengths)

    @classmethod
    def from_torch(cls, module: nn.RNN) -> RNN:
        """A copy of a `torch.nn.RNN` as a funcdp `RNN` (same weights, config and mode)."""
        return _convert(cls, module, nonlinearity=module.nonlinearity)

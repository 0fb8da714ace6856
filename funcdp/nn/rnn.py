"""`RNN`, `LSTM` and `GRU` written with plain tensor ops, so `vmap` batches them.

They subclass `torch.nn.RNN`/`LSTM`/`GRU` and replace only `forward`: constructor, parameter
names (`weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`, `weight_hr_l0`, `..._reverse`),
initialization and `state_dict` are torch's, so a checkpoint loads either way. The math follows
torch's documentation (gate order i, f, g, o for LSTM and r, z, n for GRU).

torch's own recurrent kernels do not batch under `vmap` (on CPU, LSTM calls `mkldnn_rnn_layer`,
which has no batching rule, and falls back to a slow per-example loop; GRU and RNN fail with a
shape error). Here the input projection is one `F.linear` over all steps and the time loop is
`funcdp.nn.recurrence`, one op with a hand-written backward through time and a `vmap` rule.
First derivatives are exact; second derivatives are refused (use torch's layers for those).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from funcdp.nn.recurrence import recurrence

Tensor = torch.Tensor


def _direction(
    module: nn.RNNBase,
    name: str,
    x: Tensor,
    state: tuple[Tensor, Tensor | None],
    valid: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one layer (`name` is e.g. "l0" or "l1_reverse"); x is [T, N, F]."""
    b_ih = getattr(module, f"bias_ih_{name}") if module.bias else None
    b_hh = getattr(module, f"bias_hh_{name}") if module.bias else None
    w_hh = getattr(module, f"weight_hh_{name}")
    w_hr = getattr(module, f"weight_hr_{name}") if module.proj_size > 0 else None
    x_part = F.linear(x, getattr(module, f"weight_ih_{name}"), b_ih)
    reverse = name.endswith("_reverse")
    return recurrence(module.mode, reverse, x_part, *state, (w_hh, b_hh, w_hr), valid)


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
        input, lengths = pad_packed_sequence(packed)
        batch_first, batched = False, True
    else:
        batch_first, batched = module.batch_first, input.dim() == 3
        if input.dim() not in (2, 3):
            raise ValueError(
                f"input must be 2-D (unbatched) or 3-D, got shape {tuple(input.shape)}"
            )
        if not batched:  # [T, F] -> [T, 1, F]
            input = input.unsqueeze(1)
            hx = None if hx is None else _map_state(hx, lambda s: s.unsqueeze(1))
        elif batch_first:
            input = input.transpose(0, 1)
    x = input  # [T, N, F]
    steps, batch = x.shape[0], x.shape[1]
    valid = None
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=x.device)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
        valid = (torch.arange(steps, device=x.device).unsqueeze(-1) < lengths).unsqueeze(-1)
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
        out = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=not sorted_ok)
        return out, hidden
    if not batched:
        return x.squeeze(1), _map_state(hidden, lambda s: s.squeeze(1))
    return (x.transpose(0, 1) if batch_first else x), hidden


def _initial_state(module: nn.RNNBase, hx, x: Tensor) -> tuple[Tensor, Tensor | None]:
    count = module.num_layers * (2 if module.bidirectional else 1)
    out_size = module.proj_size or module.hidden_size
    is_lstm = module.mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(count, x.shape[1], out_size)
        return h0, (x.new_zeros(count, x.shape[1], module.hidden_size) if is_lstm else None)
    if is_lstm:
        if not isinstance(hx, tuple) or len(hx) != 2:
            raise ValueError("LSTM hx must be a tuple (h_0, c_0)")
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    expected = (count, x.shape[1], out_size)
    if tuple(h0.shape) != expected:
        raise ValueError(f"hx (h_0) must have shape {expected}, got {tuple(h0.shape)}")
    if c0 is not None and tuple(c0.shape) != (count, x.shape[1], module.hidden_size):
        raise ValueError(
            f"c_0 must have shape {(count, x.shape[1], module.hidden_size)}, got {tuple(c0.shape)}"
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

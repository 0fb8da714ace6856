"""The time loop of funcdp's recurrent layers: one op with a hand-written backward through time.

Under `vmap(grad(...))` every op of a time step pays for autograd's graph and for functorch's
batching wrappers, and a recurrent layer runs about ten ops per step. Here the loop of one
direction of one layer is a single differentiable op (`recurrence`):

- its forward and its backward through time are each a plain eager loop that writes into
  preallocated buffers (`_Forward` and `_Backward`, whose `vmap` rule folds the vmapped dimension
  into the batch, so a vmapped call runs the loop once for all examples);
- the activation derivatives are computed once for all steps, not step by step;
- the weight gradients are one matmul over all steps, which `vmap` turns into one batched matmul
  per example (no outer product per step).

Layout: sequences are time-major `[T, N, ...]`, states `[N, ...]`. Internal buffers are in scan
order (step k reads time `T - 1 - k` when `reverse`); `hs[k]` is the state step k reads. The
backward is exact for first derivatives; second derivatives through it are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Function

Tensor = torch.Tensor
LSTM, GRU, RNN_TANH, RNN_RELU = "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
_GATES = {LSTM: 4, GRU: 3, RNN_TANH: 1, RNN_RELU: 1}

# How each argument / output of the two loops carries the batch, for their vmap rule:
# "seq" at dim 1 ([T, N, ...]), "state" at dim 0 ([N, ...]), "weight" nowhere, "static" not a tensor.
# Outputs marked "seq*" are handed back with the vmapped dimension first and contiguous: they
# meet the weight-gradient matmuls, which run about 3x slower on a time-major layout.
_FORWARD_ARGS = ("static", "static", "seq", "state", "state", "weight", "weight", "weight", "seq")
_FORWARD_OUTS = ("seq*", "state", "state", "seq*", "seq", "seq", "seq")
_BACKWARD_ARGS = (
    ("static", "static", "seq", "state", "state")
    + ("seq", "seq", "seq", "seq")
    + ("weight", "weight", "seq")
)
_BACKWARD_OUTS = ("seq*", "seq*", "seq*", "state", "state")


def _time_order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _forward_loop(mode, reverse, x_part, h0, c0, w_hh, b_hh, w_hr, valid):
    """Runs the recurrence; returns the outputs, final states and what the backward reads.

    Returns:
      out [T, N, H_out] in time order (zero past a sequence's length), h_T, c_T (LSTM) and, in
      scan order: hs [T + 1, N, H_out]; cs [T + 1, N, H] (LSTM); acts [T, N, G], the gate
      activations; aux: tanh(c) [T, N, H] (LSTM), the recurrent projection [T, N, 3H] (GRU).
    """
    steps, hidden = x_part.shape[0], x_part.shape[-1] // _GATES[mode]
    w_t = w_hh.t()
    per_step = x_part if b_hh is None or mode == GRU else x_part + b_hh
    hs = h0.new_empty(steps + 1, *h0.shape)
    hs[0] = h0
    acts = x_part.new_empty(x_part.shape)
    cs = aux = None
    if mode == LSTM:
        cs = c0.new_empty(steps + 1, *c0.shape)
        cs[0] = c0
        aux = c0.new_empty(steps, *c0.shape)
    elif mode == GRU:
        aux = x_part.new_empty(x_part.shape)
    for k, t in enumerate(_time_order(steps, reverse)):
        h, a, h_new = hs[k], acts[k], hs[k + 1]
        if mode == LSTM:
            gates = torch.addmm(per_step[t], h, w_t)
            torch.sigmoid(gates, out=a)
            torch.tanh(gates[:, 2 * hidden : 3 * hidden], out=a[:, 2 * hidden : 3 * hidden])
            i, f, g, o = a.chunk(4, 1)
            c_new = torch.addcmul(f * cs[k], i, g, out=cs[k + 1])
            tanh_c = torch.tanh(c_new, out=aux[k])
            if w_hr is None:
                torch.mul(o, tanh_c, out=h_new)
            else:
                torch.mm(o * tanh_c, w_hr.t(), out=h_new)
            if valid is not None:
                torch.where(valid[t], c_new, cs[k], out=c_new)
        elif mode == GRU:
            x, hh = per_step[t], aux[k]
            if b_hh is None:
                torch.mm(h, w_t, out=hh)
            else:
                torch.addmm(b_hh, h, w_t, out=hh)
            torch.sigmoid(x[:, : 2 * hidden] + hh[:, : 2 * hidden], out=a[:, : 2 * hidden])
            r, z = a[:, :hidden], a[:, hidden : 2 * hidden]
            n = torch.addcmul(x[:, 2 * hidden :], r, hh[:, 2 * hidden :])
            torch.tanh(n, out=a[:, 2 * hidden :])
            torch.lerp(a[:, 2 * hidden :], h, z, out=h_new)
        else:
            pre = torch.addmm(per_step[t], h, w_t)
            if mode == RNN_TANH:
                torch.tanh(pre, out=a)
            else:
                torch.clamp_min(pre, 0, out=a)
            h_new.copy_(a)
        if valid is not None:
            torch.where(valid[t], h_new, h, out=h_new)
    out = hs[1:]
    if valid is not None:
        out = out * (valid.flip(0) if reverse else valid)
    out = out.flip(0) if reverse else out.clone()
    c_last = None if cs is None else cs[-1].clone()
    return out, hs[-1].clone(), c_last, hs, cs, acts, aux


def _backward_loop(mode, reverse, d_out, d_h, d_c, hs, cs, acts, aux, w_hh, w_hr, valid):
    """Backward through time of `_forward_loop`.

    Returns, in scan order: the gradient of the input projection [T, N, G], that of the
    recurrent projection (GRU only; for the others it is the same), that of the projected
    output (LSTM with `proj_size`), and the gradients of h_0 and c_0.
    """
    steps = acts.shape[0]
    d_x = torch.empty_like(acts)
    d_hh = d_proj = None
    if mode == LSTM:
        i, f, g, o = acts.chunk(4, -1)
        tanh_c = aux
        # d gates = [dc * q_i, dc * q_f, dc * q_g, dm * q_o]; dc += dm * o (1 - tanh(c)^2)
        q = torch.stack([g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g)], 2)
        q_o = tanh_c * o * (1 - o)
        o_dc = o * (1 - tanh_c * tanh_c)
        hidden = tanh_c.shape[-1]
        if w_hr is not None:
            d_proj = torch.empty_like(hs[1:])
    elif mode == GRU:
        hidden = acts.shape[-1] // 3
        r, z, n = acts.chunk(3, -1)
        d_n = (1 - z) * (1 - n * n)
        d_r = d_n * aux[..., 2 * hidden :] * r * (1 - r)
        d_z = (hs[:-1] - n) * z * (1 - z)
        q = torch.stack([d_r, d_z, d_n], 2)
        q_hh = torch.stack([d_r, d_z, d_n * r], 2)
        d_hh = torch.empty_like(acts)
    else:
        q = 1 - acts * acts if mode == RNN_TANH else (acts > 0).to(acts.dtype)
    order = list(_time_order(steps, reverse))
    for k in range(steps - 1, -1, -1):
        t = order[k]
        d_raw = d_h + d_out[t]
        if valid is not None:
            keep = valid[t].to(d_h.dtype)
            d_raw = d_raw * keep
            d_h = d_h - d_h * keep  # what passes a masked step unchanged
        else:
            d_h = None
        if mode == LSTM:
            d_m = d_raw
            if d_proj is not None:
                d_proj[k] = d_raw
                d_m = d_raw @ w_hr
            d_c_raw = d_c if valid is None else d_c * keep
            d_c_total = torch.addcmul(d_c_raw, d_m, o_dc[k])
            view = d_x[k].view(-1, 4, hidden)
            torch.mul(q[k], d_c_total.unsqueeze(1), out=view[:, :3])
            torch.mul(q_o[k], d_m, out=view[:, 3])
            d_c = (
                d_c_total * f[k] if valid is None else torch.addcmul(d_c - d_c_raw, d_c_total, f[k])
            )
            back = d_x[k]
        elif mode == GRU:
            rows = d_raw.unsqueeze(1)
            torch.mul(q[k], rows, out=d_x[k].view(-1, 3, hidden))
            back = torch.mul(q_hh[k], rows, out=d_hh[k].view(-1, 3, hidden)).view(-1, 3 * hidden)
            direct = d_raw * z[k]
            d_h = direct if d_h is None else d_h + direct
        else:
            back = torch.mul(q[k], d_raw, out=d_x[k])
        d_h = back @ w_hh if d_h is None else torch.addmm(d_h, back, w_hh)
    return d_x, d_hh, d_proj, d_h, (d_c if mode == LSTM else None)


def _fold(x: Any, dim: int | None, kind: str, size: int) -> Any:
    """Moves the vmapped dimension `dim` of `x` into its batch dimension (expanding if absent)."""
    if kind in ("static", "weight") or x is None:
        return x
    axis = 1 if kind == "seq" else 0
    if dim is None:
        x = x.unsqueeze(axis).expand(*x.shape[:axis], size, *x.shape[axis:])
    else:
        x = x.movedim(dim, axis)
    return x.flatten(axis, axis + 1)


def _unfold(x: Tensor | None, kind: str, size: int) -> tuple[Tensor | None, int | None]:
    """Splits the batch dimension of an output into (vmapped, batch); returns it and its dim."""
    if x is None:
        return None, None
    if kind == "state":
        return x.unflatten(0, (size, -1)), 0
    x = x.unflatten(1, (size, -1))
    return (x, 1) if kind == "seq" else (x.movedim(1, 0).contiguous(), 0)


def _vmap_rule(function: type[Function], arg_kinds, out_kinds, info, in_dims, *args):
    """Runs `function` once on the examples' rows side by side (per example if weights vary)."""
    size = info.batch_size
    weights_vary = any(
        d is not None for d, k in zip(in_dims, arg_kinds, strict=True) if k == "weight"
    )
    if weights_vary:  # rare (vmap over parameters): one call per element, stacked
        results = []
        for b in range(size):
            picked = [
                a if d is None else a.select(d, b) for a, d in zip(args, in_dims, strict=True)
            ]
            results.append(function.apply(*picked))
        outs = tuple(
            None if parts[0] is None else torch.stack(parts) for parts in zip(*results, strict=True)
        )
        return outs, tuple(None if o is None else 0 for o in outs)
    folded = [_fold(a, d, k, size) for a, d, k in zip(args, in_dims, arg_kinds, strict=True)]
    pairs = [_unfold(o, k, size) for o, k in zip(function.apply(*folded), out_kinds, strict=True)]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def _no_autocast(x: Tensor) -> torch.autocast:
    return torch.autocast(x.device.type, enabled=False)


class _Forward(Function):
    @staticmethod
    def forward(*args):
        with _no_autocast(args[2]):
            return _forward_loop(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_rule(_Forward, _FORWARD_ARGS, _FORWARD_OUTS, info, in_dims, *args)


class _Backward(Function):
    @staticmethod
    def forward(*args):
        with _no_autocast(args[2]):
            return _backward_loop(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "funcdp.nn recurrent layers do not support second derivatives; use torch's layers"
        )

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_rule(_Backward, _BACKWARD_ARGS, _BACKWARD_OUTS, info, in_dims, *args)


class _Recurrence(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x_part, h0, c0, w_hh, b_hh, w_hr, valid, mode, reverse):
        return _Forward.apply(mode, reverse, x_part, h0, c0, w_hh, b_hh, w_hr, valid)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, _, w_hh, b_hh, w_hr, valid, mode, reverse = inputs
        _, _, _, hs, cs, acts, aux = output
        ctx.mode, ctx.reverse, ctx.has_bias = mode, reverse, b_hh is not None
        ctx.save_for_backward(w_hh, w_hr, valid, hs, cs, acts, aux)
        ctx.mark_non_differentiable(*(t for t in (hs, cs, acts, aux) if t is not None))

    @staticmethod
    def backward(ctx, d_out, d_h, d_c, *_):
        w_hh, w_hr, valid, hs, cs, acts, aux = ctx.saved_tensors
        d_x, d_hh, d_proj, d_h0, d_c0 = _Backward.apply(
            ctx.mode, ctx.reverse, d_out, d_h, d_c, hs, cs, acts, aux, w_hh, w_hr, valid
        )
        d_hh = d_x if d_hh is None else d_hh
        d_w_hh = d_hh.flatten(0, 1).t() @ hs[:-1].flatten(0, 1)
        d_b_hh = d_hh.sum((0, 1)) if ctx.has_bias else None
        d_w_hr = None
        if d_proj is not None:
            o, tanh_c = acts.chunk(4, -1)[3], aux
            d_w_hr = d_proj.flatten(0, 1).t() @ (o * tanh_c).flatten(0, 1)
        d_x = d_x.flip(0) if ctx.reverse else d_x
        return d_x, d_h0, d_c0, d_w_hh, d_b_hh, d_w_hr, None, None, None


def recurrence(
    mode: str,
    reverse: bool,
    x_part: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: tuple[Tensor, Tensor | None, Tensor | None],
    valid: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one layer over time.

    Args:
      mode: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU".
      reverse: run from the last step to the first.
      x_part: the input projection `x @ W_ih^T + b_ih` for all steps, [T, N, G*H].
      h0, c0: the initial states [N, H_out] and [N, H] (c0 None except for LSTM).
      weights: (W_hh, b_hh, W_hr), b_hh and W_hr may be None.
      valid: bool [T, N, 1] marking the steps within each sequence's length, or None.

    Returns:
      outputs [T, N, H_out] (zero past a sequence's length), h_T and c_T (None but for LSTM).
      The loop runs in the weights' dtype with autocast off (an autocast input projection
      comes in as bfloat16 or float16 and is cast up).
    """
    w_hh, b_hh, w_hr = weights
    x_part, h0 = x_part.to(w_hh.dtype), h0.to(w_hh.dtype)
    c0 = None if c0 is None else c0.to(w_hh.dtype)
    out, h, c, *_ = _Recurrence.apply(x_part, h0, c0, w_hh, b_hh, w_hr, valid, mode, reverse)
    return out, h, c

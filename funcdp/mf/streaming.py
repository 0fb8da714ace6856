"""Streaming noise: (C^-1 z)_t from z_t and a small state, one step at a time.

Each function takes the state of one tensor (a buffer [m, *shape] in the tensor's dtype and
device), the fresh standard normal draw z_t of that shape and the step index t, and returns
(C^-1 z)_t and the new state. None of them forms an n x n matrix; `tests/test_mf.py` checks
each against the dense `strategy.inverse_matrix(n) @ z`.
"""

from __future__ import annotations

import functools

import torch


def banded_step(
    buffer: torch.Tensor, z: torch.Tensor, coefficients: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward substitution in a banded Toeplitz C with c_0 = 1: y_t = z_t - sum_l c_l y_{t-l}.

    The buffer holds the last `bands - 1` outputs, newest first.
    """
    if buffer.shape[0] == 0:
        return z, buffer
    y = _subtract_weighted(z, coefficients[1:], buffer)
    return y, torch.cat([y[None], buffer[:-1]])


def blt_step(
    buffer: torch.Tensor, z: torch.Tensor, thetas: tuple[float, ...], omegas: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward substitution in a buffered linear Toeplitz C (coefficients 1, then
    sum_i omega_i theta_i^(m-1)): y_t = z_t - sum_i omega_i S_i.

    Buffer i holds S_i = sum_{s < t} theta_i^(t-1-s) y_s and is updated S_i <- theta_i S_i + y_t
    (McMahan, Xu & Zhang 2024, arXiv:2405.13763; run on the outputs to solve C y = z). Two
    passes over the buffers: one matrix-vector product for y, one fused multiply-add that
    writes every new buffer (the old ones stay as they were: the state is never mutated).
    """
    y = _subtract_weighted(z, omegas, buffer)
    scale = _constant(thetas, buffer.dim(), buffer.dtype, buffer.device)
    return y, torch.addcmul(y.unsqueeze(0), scale, buffer)


def _subtract_weighted(
    z: torch.Tensor, weights: tuple[float, ...], buffer: torch.Tensor
) -> torch.Tensor:
    """z - sum_i weights[i] buffer[i], in one matrix-vector product over the flattened buffer."""
    vector = _constant(weights, 1, buffer.dtype, buffer.device)
    rows = buffer.reshape(buffer.shape[0], z.numel())  # numel, not -1: empty leaves too
    return torch.addmv(z.reshape(-1), rows.T, vector, alpha=-1).reshape(z.shape)


@functools.lru_cache(maxsize=256)
def _constant(
    values: tuple[float, ...], dim: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`values` as a [m, 1, ..., 1] tensor with `dim` dimensions (it broadcasts over a buffer),
    built once per dtype and device rather than at every step. Never written to."""
    shape = (len(values),) + (1,) * (dim - 1)
    return torch.tensor(values, dtype=dtype, device=device).reshape(shape)


def tree_step(
    buffer: torch.Tensor, z: torch.Tensor, index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The binary tree's noise on one gradient: the prefix noise at t minus that at t - 1.

    Step t (counted from 1) closes the node of level l = the number of trailing zero bits of t,
    which covers the nodes of levels < l of step t - 1's binary decomposition. Slot l of the
    buffer holds the noise of the open level-l node, zero where none is open (Dwork et al. 2010,
    Chan, Shi & Song 2011).
    """
    count = index + 1
    level = (count & -count).bit_length() - 1
    if level >= buffer.shape[0]:
        raise ValueError(f"tree noise has {buffer.shape[0]} levels, step {index} needs {level}")
    y = z - buffer[:level].sum(0)
    new = buffer.clone()
    new[:level] = 0
    new[level] = z
    return y, new

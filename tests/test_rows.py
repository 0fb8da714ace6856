"""The row check (`funcdp.ghost.rows`): its cheap bound on an op's terms decides alone which
examples are not amplified, so it must never fall below the exact sum it stands in for; and
`capture.row_free` tells which losses it covers whole (their eager steps compute real rows
only)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import funcdp as fdp
from funcdp.ghost import capture, rows
from tests import models


def _op(kind, **config):
    return capture.OpSpec(kind, None, None, config, (), torch.float32, "weight")


def _patch_norms(x, nd, kernel, stride, padding, dilation) -> torch.Tensor:
    """[B, positions]: the norm of the input patch each output position reads, by unfold (a
    1-d input as one of height 1)."""
    if nd == 1:
        x = x[:, :, None]
        kernel, stride, padding, dilation = (1, kernel), (1, stride), (0, padding), (1, dilation)
    columns = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return torch.linalg.vector_norm(columns, dim=1)


@settings(max_examples=60, deadline=None)
@given(
    nd=st.sampled_from([1, 2]),
    channels=st.integers(1, 6),
    out_channels=st.integers(1, 6),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    length=st.integers(6, 12),
    common=st.sampled_from([0.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_the_conv_bound_is_at_least_the_exact_terms(
    nd, channels, out_channels, kernel, stride, padding, dilation, length, common, seed
):
    gen = torch.Generator().manual_seed(seed)
    size = 3
    x = torch.randn(size, channels, *(length,) * nd, generator=gen)
    x = x + common * torch.randn(size, channels, *(1,) * nd, generator=gen)
    weight = torch.randn(out_channels, channels, *(kernel,) * nd, generator=gen)
    conv = (F.conv1d, F.conv2d)[nd - 1]
    out = conv(x, weight, None, stride, padding, dilation)
    g = torch.randn(out.shape, generator=gen)
    op = _op(capture.CONV, nd=nd, stride=stride, padding=padding, dilation=dilation, groups=1)
    exact = rows._reach(op, x, g, weight.shape)
    patches = _patch_norms(x, nd, kernel, stride, padding, dilation)
    loop = ((patches + 1) * torch.linalg.vector_norm(g.flatten(2), dim=1)).double().sum(1)
    torch.testing.assert_close(exact, loop, rtol=1e-4, atol=0.0)
    assert bool((rows._reach_bound(op, x, g, weight.shape) >= exact * (1 - 1e-5)).all())


@settings(max_examples=60, deadline=None)
@given(
    positions=st.integers(1, 20),
    d=st.integers(1, 10),
    p=st.integers(1, 10),
    common=st.sampled_from([0.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_the_linear_bound_is_at_least_the_exact_terms(positions, d, p, common, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4, positions, d, generator=gen) + common * torch.randn(4, 1, d, generator=gen)
    g = torch.randn(4, positions, p, generator=gen)
    op = _op(capture.LINEAR)
    exact = rows._reach(op, a, g, (p, d))
    loop = ((a.norm(dim=-1) + 1) * g.norm(dim=-1)).double().sum(1)
    torch.testing.assert_close(exact, loop, rtol=1e-5, atol=0.0)
    bound = rows._reach_bound(op, a, g, (p, d))
    assert bool((bound >= exact * (1 - 1e-5)).all())
    assert math.isfinite(float(bound.max()))


def _row_free(module, *example) -> bool:
    apply_fn, params, buffers = fdp.functionalize(module)

    def loss(params, *example):
        out = apply_fn(params, buffers, *(x[None] for x in example))
        return (out[0] if isinstance(out, tuple) else out).square().sum()

    return capture.row_free(capture.plan(loss, params, example, vmap_all=True))


@pytest.mark.parametrize(
    "name,free",
    [
        ("linear_layernorm", True),
        ("conv2d", True),
        ("embedding", True),
        ("tied", True),
        ("frozen", True),
        ("multihead_attention", False),  # torch's own attention: the weights' views
    ],
)
def test_row_free_where_every_parameter_has_one_use_the_check_covers(name, free):
    module, x, _ = models.make(name, 3)
    assert _row_free(module, x) == free


def test_not_row_free_where_a_parameter_is_used_otherwise_or_not_seen():
    x = torch.randn(3, 4, 5)
    assert not _row_free(fdp.nn.LSTM(5, 3, batch_first=True), x)  # its recurrent time loop
    assert not _row_free(torch.nn.ConvTranspose1d(4, 2, 3), x)
    assert not _row_free(fdp.nn.Bilinear(5, 5, 2), x, x)
    unused = torch.nn.Sequential(torch.nn.Linear(5, 2))
    unused.register_parameter("spare", torch.nn.Parameter(torch.zeros(2)))
    assert not _row_free(unused, x)

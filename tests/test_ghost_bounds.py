"""The arithmetic behind ghost clipping's certified Gram norms (`funcdp.ghost.bounds`, `matmul`):
each bound holds against float64 references at every scale, underflow and overflow included."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcdp._certify import gamma, unit_roundoff
from funcdp.ghost import bounds, matmul


def _rows(seed: int, shape, exponent: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 10.0**exponent).float()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(exponent=st.integers(-25, 18), positions=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_quadratic_is_an_upper_bound(exponent, positions, seed):
    """n^T M n for n, M >= 0 in float32, tiny (products underflow) to huge: never below the
    float64 value."""
    norms = _rows(seed, (3, positions), exponent).abs()
    matrix = _rows(seed + 1, (3, positions, positions), exponent).abs()
    exact = torch.einsum("nt,nts,ns->n", norms.double(), matrix.double(), norms.double())
    bound = bounds.quadratic(norms, matrix)
    assert bound.dtype == torch.float64
    assert (bound >= exact).all()
    if exact.max() < 1e36:  # within float32's range, not loose: underflow is the only slack
        lost = bounds.underflow(positions, torch.float32)
        slack = 1.01 * lost * (norms.double().sum(1) + 1.0)
        assert (bound <= exact * (1 + 1e-4) + slack).all()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(exponent=st.integers(-22, 9), positions=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_inner_rows_stays_within_its_error_bound(exponent, positions, seed):
    """Each row of sum_s x_ts y_ts in float32 is within gamma_(T+1) sum_s |x_ts y_ts| plus
    `underflow(T)` of the float64 value, cancelling rows included."""
    x = _rows(seed, (2, positions, positions), exponent)
    y = _rows(seed + 1, (2, positions, positions), exponent)
    exact = (x.double() * y.double()).sum(2)
    size = (x.double() * y.double()).abs().sum(2)
    slack = gamma(positions + 1, unit_roundoff(torch.float32)) * size
    slack = slack + bounds.underflow(positions, torch.float32)
    assert ((bounds.inner_rows(x, y) - exact).abs() <= slack).all()


def test_an_overflowed_estimate_is_flagged():
    estimate = torch.tensor([float("inf"), 4.0], dtype=torch.float64)
    bound = torch.tensor([float("inf"), 2.0], dtype=torch.float64)
    reach = torch.tensor([1.0, 2.0], dtype=torch.float64)
    flagged = bounds.flagged(bound, estimate, torch.ones(2, dtype=torch.bool), reach)
    assert flagged.tolist() == [True, False]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    exponent=st.integers(-20, 17),
    positions=st.integers(2, 7),
    cancel=st.booleans(),
    wide=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gram_form_norms_are_upper_bounds_at_every_scale(exponent, positions, cancel, wide, seed):
    """A Gram-form piece bounds, at every scale (underflowing values, ones whose Gram products
    overflow float32) and with output gradients that cancel or not: the exact (float64)
    gradient of its float32 A and G where it certifies the Gram form (`exact`), and on every
    example what the book adds for it (a formed example's formed gradient); all finite. The
    Grams are float32 (as on large ops) or, `wide`, float64 (as on small ones)."""
    size, d, p = 3, 12, 10  # p d > 2 T^2: the Gram form
    a = _rows(seed, (size, positions, 1, d), exponent)
    g = _rows(seed + 1, (size, positions, 1, p), exponent)
    if cancel:  # a common input part, output gradients summing to nearly nothing
        a = a + _rows(seed + 2, (size, 1, 1, d), exponent + 3)
        g = torch.cat([g[:, :1], -g[:, :1] * (1 + 1e-6), g[:, 2:]], dim=1)
    real = torch.ones(size, dtype=torch.bool)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matmul, "SMALL_GRAMS", 1 << 22 if wide else 0)
        pending = matmul.matmul_piece("w", a, g, (p, d), real, matmul.Budget(0))  # Gram form
        (piece,) = matmul.certify([pending])
    exact = torch.einsum("ntp,ntd->npd", g[:, :, 0].double(), a[:, :, 0].double())
    exact_squares = exact.square().sum((1, 2))
    assert torch.isfinite(piece.squared_norms).all()
    certified = torch.isfinite(piece.exact)
    assert (piece.exact[certified] >= exact_squares[certified]).all()
    assert (piece.squared_norms[certified] >= exact_squares[certified]).all()
    for i in range(size):
        added = piece.book(torch.eye(size)[i]).double()
        assert math.isfinite(float(added.abs().max()))
        assert float(added.square().sum()) <= float(piece.squared_norms[i])


@pytest.mark.parametrize(
    "stacked, stacks", [(matmul.STACKED_GRAM_ELEMENTS, [5]), (2 * 4 * 6 * 6, [2, 2, 1])]
)
def test_weights_certified_together_as_each_alone(stacked, stacks):
    """`certify` stacks the Grams of weights with one Gram shape (all five, or two, two and one
    under a smaller cap) for one run of the bound arithmetic, whatever their widths: each piece
    is what certifying it alone gives, whether its examples are formed (a crafted cancelling
    example), certified in the Gram form, of the same widths as the others or of other ones."""
    size, positions = 4, 6
    widths = [(12, 10), (12, 10), (12, 10), (13, 10), (9, 17)]  # (d, p)
    real = torch.ones(size, dtype=torch.bool)
    jobs = []
    for seed, (d, p) in enumerate(widths):
        a, g = _rows(seed, (size, positions, 1, d), 0), _rows(seed + 9, (size, positions, 1, p), 0)
        if seed in (1, 4):  # example 2: a large common input part, output gradients that cancel
            a[2] += 1e4 * _rows(99, (1, 1, d), 0)
            g[2, 1] = -g[2, 0] * (1 + 1e-6)
            g[2, 2:] = 0
        jobs.append(matmul.matmul_piece(f"w{seed}", a, g, (p, d), real, matmul.Budget(0)))
    assert all(isinstance(job, matmul.Pending) for job in jobs)
    seen, certify_alike = [], matmul._certify_alike
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matmul, "SMALL_GRAMS", 0)  # float32 Grams, as on large ops
        patch.setattr(matmul, "STACKED_GRAM_ELEMENTS", stacked)
        patch.setattr(
            matmul, "_certify_alike", lambda jobs: seen.append(len(jobs)) or certify_alike(jobs)
        )
        together = matmul.certify(jobs)
        assert seen == stacks
        alone = [matmul.certify([job])[0] for job in jobs]
    factors = torch.linspace(0.2, 1.0, size)
    for one, other in zip(together, alone, strict=True):
        assert one.name == other.name
        assert torch.equal(one.squared_norms, other.squared_norms)
        assert torch.equal(one.exact, other.exact)
        assert torch.equal(one.book(factors), other.book(factors))
    assert math.isinf(float(together[1].exact[2]))  # the crafted examples were formed
    assert math.isinf(float(together[4].exact[2]))
    assert torch.isfinite(together[0].exact).all() and torch.isfinite(together[3].exact).all()

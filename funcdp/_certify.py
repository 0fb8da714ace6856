"""Rounding-safe norms and clip factors: a clip bound is a promise about floats, not reals.

A clip factor computed from a norm that came out a little too small lets an example past its
bound; a norm that came out far too small (a long float32 reduction, a Gram form with
cancellation) lets it past by any amount. Everything here returns UPPER bounds on exact
quantities, from a priori error bounds of floating-point sums (Higham, "Accuracy and Stability
of Numerical Algorithms", 2002, section 3.1): a sum of n terms computed in any order has
|error| <= gamma_n * sum |terms|, gamma_n = n u / (1 - n u), u the unit roundoff.

- `squares_upper`: sums of squares over the last dimension: in float64 for small tensors (exact
  squares, so no underflow or overflow), else by float32 blocks of `BLOCK` elements (relative
  error <= gamma_(BLOCK+3)) whose results are added in float64, so a million-element leaf costs
  one float32 pass and still has a relative error near 4e-6.
- `round_up`: a float64 bound cast to a narrower dtype without rounding it down.
- `with_margin`: clip factors shrunk by the rounding of the float multiplications that apply
  them, so that factor * gradient, as computed, stays within the bound the rule promises.
"""

from __future__ import annotations

import torch

BLOCK = 64
# Up to this many elements, widening to float64 costs less than the checks of the float32 path.
SMALL_TENSOR = 1 << 16
_U64 = 2.0**-53
# Below n * _SMALL a float32 sum of n squares may have lost underflowed terms (2^-100 is far
# above float32's smallest normal, 2^-126, so the terms lost are negligible above it).
_SMALL = 2.0**-100


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 of a floating dtype (the relative error of one rounding)."""
    return torch.finfo(dtype).eps / 2.0


def matmul_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """The unit roundoff of a matrix product in `dtype` on `device`, as torch is set to compute
    it: float32 products may run in TF32 (u = 2^-11: `torch.set_float32_matmul_precision("high")`
    or, on CUDA, `torch.backends.cuda.matmul.allow_tf32`) or bfloat16 ("medium", u = 2^-8)."""
    u = unit_roundoff(dtype)
    if dtype != torch.float32:
        return u
    precision = _float32_matmul_precision()
    if precision == "medium":
        return 2.0**-8
    tf32 = torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return 2.0**-11 if precision == "high" or tf32 else u


def gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): bounds the relative error of a sum or dot product of n terms."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 0.5 else float("inf")


def squares_upper(x: torch.Tensor) -> torch.Tensor:
    """float64 upper bounds on the exact sums of squares of `x` over its last dimension.

    Half-precision inputs are widened to float32 (exactly). Rows so small that their squares
    may underflow are scaled up by a power of two (exactly) and summed again; rows whose float32
    sum overflows while their values are finite are summed in float64. So the bound holds for
    every finite input, and a zero row's bound is exactly 0. Inside a compiled graph, which
    takes no data-dependent branch, a tiny row's bound is the threshold n 2^-100 instead, and a
    row whose squares overflow float32 (values above about 1e19) gets an infinite bound.
    """
    if x.dtype == torch.float64 or x.numel() <= SMALL_TENSOR:
        # Exact squares (float32 squares fit float64, denormals included), summed in float64.
        squares = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).square()
        return squares * (1.0 + 2.0 * gamma(x.shape[-1] + 3, _U64))
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    bound = _blocked_squares(x)
    n = max(x.shape[-1], 1)
    if torch.compiler.is_compiling():  # no data-dependent branch in a compiled graph
        return torch.where(bound < n * _SMALL, n * _SMALL * (1.0 + 2.0**-20), bound)
    if bound.numel() == 0:
        return bound
    low, high = torch.stack(torch.aminmax(bound)).tolist()  # one sync
    if low >= n * _SMALL and high < float("inf"):
        return bound  # the common case: one reduction, nothing to redo
    return _extremes(x, bound)


@torch.compiler.assume_constant_result  # a compiled step reads it when it compiles
def _float32_matmul_precision() -> str:
    return torch.get_float32_matmul_precision()


def _extremes(x: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """`bound` with tiny rows rescaled by 2^100 (exactly: rows of zeros, padding, or rows whose
    squares may underflow) and overflowed rows of finite values summed in float64."""
    n = max(x.shape[-1], 1)
    small = bound < n * _SMALL
    if bool(small.any()):
        rows = x[small] * 2.0**100
        bound = bound.index_put((small,), _blocked_squares(rows) * 2.0**-200)
    overflowed = torch.isinf(bound)
    if bool(overflowed.any()):  # in float64, which holds the squares of any finite float32
        exact = torch.linalg.vector_norm(x[overflowed].double(), dim=-1).square()
        bound = bound.index_put((overflowed,), exact * (1.0 + 2.0 * gamma(n + 3, _U64)))
    return bound


def _blocked_squares(x: torch.Tensor) -> torch.Tensor:
    """Upper bounds on the sums of squares of `x`, ignoring underflow and overflow."""
    n = x.shape[-1]
    u = unit_roundoff(x.dtype)
    if x.dtype == torch.float64 or n <= BLOCK:
        block = max(n, 1)
        squares = torch.linalg.vector_norm(x, dim=-1).double().square()
    else:
        block, full = BLOCK, n - n % BLOCK
        blocks = x[..., :full].unflatten(-1, (-1, BLOCK))
        squares = torch.linalg.vector_norm(blocks, dim=-1).double().square().sum(-1)
        if full < n:
            squares = squares + torch.linalg.vector_norm(x[..., full:], dim=-1).double().square()
    # One block: its squares, their sum and the sqrt round (gamma_(block+3)); then the float64
    # sum of the n / block results; and the squares lost to underflow, at most n * 2^-126,
    # under 2^-26 of any sum above n * _SMALL.
    relative = gamma(block + 3, u) + gamma(n // block + 3, _U64) + 2.0**-26
    return squares * (1.0 + 2.0 * relative)


def sqrt_upper(squares: torch.Tensor) -> torch.Tensor:
    """An upper bound on sqrt of each entry (float64 in, float64 out)."""
    return squares.sqrt() * (1.0 + 2.0 * _U64)


def norm_dtype(tensors) -> torch.dtype:
    """The dtype norms of these tensors are reported in: float64 if one is, else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def norms_upper(squares: torch.Tensor, terms: int, like) -> torch.Tensor:
    """Upper bounds on the norms whose squares are float64 sums of `terms` upper bounds (the
    sums' own rounding included), rounded up to the norm dtype of the tensors `like`."""
    squares = squares * (1.0 + 2.0 * gamma(terms + 1, _U64))
    return round_up(sqrt_upper(squares), norm_dtype(like))


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` (float64) cast to `dtype`, stepping to the next value up wherever the cast rounded
    down, so that an upper bound stays one."""
    if dtype == x.dtype:
        return x
    cast = x.to(dtype)
    # For positive values, c (1 + eps) is at least the next representable value above c.
    return torch.where(cast.to(x.dtype) < x, cast * (1.0 + torch.finfo(dtype).eps), cast)


def with_margin(factors: torch.Tensor, u: float) -> torch.Tensor:
    """Factors other than exactly 1 shrunk by 4 units of roundoff `u`, the roundoff of the
    operations that apply them (`unit_roundoff` of the dtype that scales the gradient, or
    `matmul_roundoff` where a matrix product applies them, as ghost clipping's does).

    The factor's own rounding (computing it, casting it) and the rounding of each product
    factor * g_j add at most about 2 u to the scaled example's norm; a factor of 1 leaves the
    gradient as it is, so it needs no margin.
    """
    return torch.where(factors == 1, factors, factors * (1.0 - 4.0 * u))

"""The certified parts of ghost clipping's norms: error bounds of Gram forms, and when an example
leaves the Gram form for its formed gradient (`funcdp.ghost.rules`)."""

from __future__ import annotations

import torch

from funcdp._certify import gamma, sqrt_upper, unit_roundoff

# The largest relative excess of a certified norm over its estimate before the formed path.
TOLERANCE = 2.0**-10
# The largest ratio of an example's terms, sum_t |A_t| |G_t|, to its gradient's norm outside the
# formed path; ordinary data sits near sqrt(T) (8 on the benchmark transformer).
AMPLIFICATION = 64.0
# Up to this many multiply-adds, an op's Gram matrices are computed in float64 (their error
# bound then nearly vanishes); above it in the working dtype, whose bound costs up to TOLERANCE.
SMALL_GRAMS = 1 << 22
# At most this many elements of per-example gradients (over the batch and every op of one ghost
# pass; 256 MiB in float32) are formed where forming is faster than Grams but takes more memory.
EXPLICIT_ELEMENTS = 1 << 26
# From this width (p + d) on, a float32 Gram's error bound misses TOLERANCE on ordinary data, so
# each example's gradient would be formed after the Grams: GPT-2's output layer (p + d = 8256)
# missed it on every example (relative excess about 4e-3 at T = 128), its 1024- and 1280-wide
# layers on none.
WIDE_GRAMS = 4096
# Forming an op's per-example gradients takes T p d multiply-adds (in B small matrix products, and
# B p d elements written and read twice); its Gram form T^2 (p + d) and then the book-keeping's
# T p d (one large product). On this project's CPU (one thread, freed memory kept) forming was
# the faster while p d < 4 T (p + d): at 64 positions and batch 32, 0.46x to 0.68x the Gram form's
# time for widths of 128 to 512, and 1.21x for 768 x 768, where p d = 6 T (p + d); the benchmark
# transformer's step 104 against 111 ms (batch 32), 35 against 37 ms (8), 204 against 216 ms (64).
FORMING_RATIO = 4
# From this many positions on, forming an op's per-example gradients (within EXPLICIT_ELEMENTS)
# beat its Gram form on this project's CPU: at 128 positions full GPT-2's step took 0.61 against
# 0.68 s, BERT's 0.39 against 0.43 s, the benchmark transformer's 0.125 against 0.137 s; at 64
# positions the transformer's Grams were faster (0.123 against 0.127 s).
LONG_SEQUENCE = 128


def diagonal_norms(gram: torch.Tensor, n: int | list[int], u: float) -> torch.Tensor:
    """Upper bounds on each position's norm from a Gram matrix's diagonal [N, T, T] -> [N, T].

    They only size error terms: a diagonal entry is |x_t|^2 up to gamma_n (u: the product's
    roundoff), plus what underflowed squares can lose (n 2^-126, under sqrt(n) 2^-63); an
    overflowed one is inf, which sends its example to the formed path. `n` is the width of the
    rows whose products the Gram sums, or one width per equal block of the N matrices (stacked
    Grams of weights of several widths).
    """
    widths = [n] if isinstance(n, int) else n
    squares = gram.diagonal(dim1=1, dim2=2).clamp(min=0.0)
    lost, widen = (
        _column(per_block(values, squares))
        for values in (
            [k**0.5 * 2.0**-63 for k in widths],
            [1.0 + 2.0 * gamma(k + 1, u) for k in widths],
        )
    )
    return torch.add(lost, (squares * widen).sqrt(), alpha=1.0 + u)


def per_block(values: list[float], like: torch.Tensor) -> float | torch.Tensor:
    """One constant per equal block of `like`'s rows (stacked weights, in order): a plain number
    where they agree (so a lone weight's arithmetic is unchanged), else a tensor [N] holding
    each block's value for each of its rows."""
    if len(set(values)) == 1:
        return values[0]
    column = torch.tensor(values, dtype=like.dtype, device=like.device)
    return column.repeat_interleave(like.shape[0] // len(values))


def _column(constant: float | torch.Tensor) -> float | torch.Tensor:
    return constant if isinstance(constant, float) else constant[:, None]


def quadratic(norms: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """An upper bound on n^T M n per row, for n >= 0 and M >= 0: [N, T], [N, T, T] -> [N]
    (float64 out), in M's dtype: n cast to it, then M n and n^T (M n), each T nonnegative
    terms, so the relative error is at most gamma_(2 T + 3). Each step may also lose what
    underflows, at most 2 T smallest normals (`underflow`): added to M n before it is
    multiplied by n, and to the result."""
    positions, n = norms.shape[-1], norms.to(matrix.dtype)
    lost = underflow(positions, matrix.dtype) * (1.0 + 4.0 * unit_roundoff(matrix.dtype))
    weighted = (matrix * n[:, None, :]).sum(2) + lost  # [N, T]: M n
    value = (weighted * n).sum(1).double()
    return torch.add(
        lost, value, alpha=1.0 + 2.0 * gamma(2 * positions + 4, unit_roundoff(matrix.dtype))
    )


def inner_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_s x_ts y_ts for each row t of each matrix, [N, T, T] -> float64 [N, T], summed in
    the matrices' dtype: each row is off by at most gamma_(T+1) sum_s |x_ts y_ts| plus
    `underflow(T, dtype)` per row. One float32 pass, where float64 products cost a widening
    copy of both matrices (and on long sequences four times the time)."""
    return (x * y).sum(2).double()


def underflow(count: int, dtype: torch.dtype) -> float:
    """What a sum of `count` products in `dtype` can lose to underflow (flush to zero
    included): 2 count times the smallest normal."""
    return 2.0 * count * torch.finfo(dtype).tiny


def certified(estimate, error, reach, positions: int, u: float):
    """A norm bound from a squared-norm estimate and its error bound, plus the rounding the
    example's own terms add to the book-keeping sum (gamma_T reach): (bound, exact, rounding),
    exact = estimate + error bounding the exact squared norm, rounding = gamma_T reach."""
    exact, rounding = estimate + error, gamma(positions, u) * reach
    return sqrt_upper(exact.clamp(min=0.0)) + rounding, exact, rounding


def flagged(bound, estimate, real, reach) -> torch.Tensor:
    """Real rows whose bound exceeds sqrt(estimate) by more than TOLERANCE (or whose estimate
    is not a finite, non-negative number), or whose terms are more than AMPLIFICATION times
    their sum's norm: such terms, in the float32 book-keeping sum, would round the OTHER
    examples' shares by up to u times their size."""
    # An overflowed (inf) estimate counts as the largest finite one: its inf bound is not tight.
    norm = estimate.clamp(0.0, torch.finfo(estimate.dtype).max).sqrt()
    tight = (bound <= (1.0 + TOLERANCE) * norm) & (reach <= AMPLIFICATION * norm)
    return real & ~tight

"""Strategy optimization in torch for the prefix-sum workload.

The mechanism releases A x + B z with A = B C the n x n prefix-sum matrix (all ones on and below
the diagonal); at the same privacy its total squared error is proportional to

    loss(C) = ||A C^-1||_F^2 * sens(C)^2

(Choquette-Choo et al. 2023, "Multi-Epoch Matrix Factorization Mechanisms"; Denisov et
al. 2022). For a lower-triangular Toeplitz C^-1 with coefficients d, A C^-1 is Toeplitz with
coefficients cumsum(d), so ||A C^-1||_F^2 = sum_m (n - m) cumsum(d)_m^2. The sensitivity used
while optimizing is that of the earliest b-min-separated pattern (exact for non-negative,
non-increasing coefficients, see `sensitivity.toeplitz_sensitivity`); the strategy that comes
out is normalized with a bound that holds regardless.
"""

from __future__ import annotations

import math

import torch

_DTYPE = torch.float64


def prefix_sum_loss(
    inverse_coefficients: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    min_separation: int,
    max_participations: int,
) -> torch.Tensor:
    """loss(C) for a Toeplitz C with `coefficients` (length n) and C^-1 with
    `inverse_coefficients` (length n), under the earliest b-min-separated pattern. O(n)."""
    steps = inverse_coefficients.shape[0]
    error = prefix_sum_norm(inverse_coefficients)
    # Column sum of the pattern's rows: sum_j c[t - j b] over the k participations j b <= t,
    # as running sums down the columns of c laid out in rows of b.
    b, rows = min_separation, -(-steps // min_separation)
    laid = _padded(coefficients, rows * b).reshape(rows, b).cumsum(0)
    k = max_participations
    if k < rows:
        laid = laid - torch.nn.functional.pad(laid[: rows - k], (0, 0, k, 0))
    return error * laid.flatten()[:steps].square().sum()


def prefix_sum_norm(inverse_coefficients: torch.Tensor) -> torch.Tensor:
    """||A C^-1||_F^2 for a lower-triangular Toeplitz C^-1 with this first column (length n):
    A C^-1 is Toeplitz with first column cumsum(d), whose m-th entry appears n - m times."""
    steps = inverse_coefficients.shape[0]
    weights = torch.arange(steps, 0, -1, dtype=_DTYPE)
    return (weights * inverse_coefficients.cumsum(0).square()).sum()


def toeplitz_inverse(coefficients: torch.Tensor, steps: int) -> torch.Tensor:
    """The first `steps` coefficients of the inverse power series of `coefficients` (c_0 != 0):
    the first column of C^-1 for a lower-triangular Toeplitz C. Differentiable; Newton's
    iteration g <- g (2 - c g), doubling the number of correct coefficients each time, with
    products by FFT: O(n log n) time and O(n) memory (a triangular solve needs n x n)."""
    c = _padded(coefficients, steps)
    inverse, length = 1.0 / c[:1], 1
    while length < steps:
        length = min(2 * length, steps)
        residual = _product(c[:length], inverse, length)  # c g, which is 1 + O(x^(length/2))
        inverse = 2.0 * _padded(inverse, length) - _product(inverse, residual, length)
    return inverse


def _product(a: torch.Tensor, b: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` coefficients of the product of the power series a and b."""
    size = 1 << (a.shape[0] + b.shape[0] - 1).bit_length()  # no wrap-around
    return torch.fft.irfft(torch.fft.rfft(a, size) * torch.fft.rfft(b, size), size)[:length]


def _padded(x: torch.Tensor, length: int) -> torch.Tensor:
    """x cut or zero-padded to `length`."""
    return torch.nn.functional.pad(x[:length], (0, max(0, length - x.shape[0])))


def sqrt_coefficients(count: int) -> torch.Tensor:
    """The coefficients of (1 - x)^(-1/2), binom(2m, m) / 4^m: the Toeplitz square root of the
    prefix-sum matrix (Fichtenberger, Henzinger & Upadhyay 2023)."""
    values = [1.0]
    for m in range(1, count):
        values.append(values[-1] * (2 * m - 1) / (2 * m))
    return torch.tensor(values, dtype=_DTYPE)


def optimize_banded(
    steps: int, bands: int, *, min_separation: int, max_participations: int, iterations: int = 200
) -> tuple[float, ...]:
    """Banded Toeplitz coefficients (c_0 = 1, `bands` of them) minimizing `prefix_sum_loss`.

    Each coefficient is the one before times a ratio sigmoid(.) in (0, 1), so they stay positive
    and decreasing: the optimum's shape for prefix sums, and the condition under which the
    loss's sensitivity is exact. Starts from the banded square root (`sqrt_coefficients`) and
    runs L-BFGS on the ratios.
    """
    if bands == 1:
        return (1.0,)
    start = sqrt_coefficients(bands)
    ratios = torch.logit(start[1:] / start[:-1]).requires_grad_(True)

    def loss_of() -> torch.Tensor:
        c = torch.cat([torch.ones(1, dtype=_DTYPE), torch.sigmoid(ratios).cumprod(0)])
        return prefix_sum_loss(
            toeplitz_inverse(c, steps),
            c,
            min_separation=min_separation,
            max_participations=max_participations,
        )

    _minimize(loss_of, (ratios,), iterations)
    c = torch.sigmoid(ratios.detach()).cumprod(0)
    return (1.0, *(float(v) for v in c))


def blt_coefficients(thetas: torch.Tensor, omegas: torch.Tensor, steps: int) -> torch.Tensor:
    """The Toeplitz coefficients of a BLT: 1, then sum_i omega_i theta_i^(m-1) for m >= 1."""
    powers = torch.arange(steps - 1, dtype=_DTYPE)[:, None]
    tail = (thetas[None, :] ** powers * omegas[None, :]).sum(1)
    return torch.cat([torch.ones(1, dtype=_DTYPE), tail])


def optimize_blt(
    steps: int, buffers: int, *, min_separation: int, max_participations: int, iterations: int = 200
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """BLT parameters (thetas, omegas) of C minimizing `prefix_sum_loss`.

    theta_i = sigmoid(.) in (0, 1) and omega_i = softplus(.) > 0 keep C's coefficients positive
    and decreasing like those of the prefix sums' square root, which it approximates; C^-1 then
    stays bounded. The decays start spread geometrically between 1 - 1/2 and 1 - 1/n, with
    omega_i = 2 (1 - theta_i).
    """
    gaps = torch.logspace(math.log10(0.5), math.log10(1.0 / steps), buffers, dtype=_DTYPE)
    raw_theta = torch.logit(1.0 - gaps).requires_grad_(True)
    raw_omega = torch.log(torch.expm1(2.0 * gaps)).requires_grad_(True)

    def loss_of() -> torch.Tensor:
        c = blt_coefficients(torch.sigmoid(raw_theta), _softplus(raw_omega), steps)
        return prefix_sum_loss(
            toeplitz_inverse(c, steps),
            c,
            min_separation=min_separation,
            max_participations=max_participations,
        )

    for _ in range(4):  # fresh L-BFGS histories: one long run can stall in a poor basin
        _minimize(loss_of, (raw_theta, raw_omega), iterations // 4)
    thetas = torch.sigmoid(raw_theta.detach())
    omegas = _softplus(raw_omega.detach())
    return tuple(float(t) for t in thetas), tuple(float(w) for w in omegas)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(x)


def _minimize(loss_of, variables: tuple[torch.Tensor, ...], iterations: int) -> None:
    """L-BFGS on `variables`, left at the best finite point it evaluated (a BLT's inverse can
    overflow far from the optimum; such points count as infinitely bad)."""
    params = list(variables)
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-12
    )
    best = [math.inf, [p.detach().clone() for p in params]]

    def step():
        optimizer.zero_grad()
        loss = loss_of()
        if not torch.isfinite(loss):
            return torch.tensor(math.inf, dtype=_DTYPE)
        loss.backward()
        if float(loss.detach()) < best[0]:
            best[:] = [float(loss.detach()), [p.detach().clone() for p in params]]
        return loss

    optimizer.step(step)
    with torch.no_grad():
        for p, value in zip(params, best[1], strict=True):
            p.copy_(value)

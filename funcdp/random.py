"""JAX-like explicit randomness for torch: keys are data, derived deterministically.

A key is an int64 tensor of shape [2] on the CPU. `split` and `fold_in` derive new keys with a
splitmix64 mix, so derived streams are independent for practical purposes and reproducible on
every run. `normal` seeds a `torch.Generator` from the key, so the same key gives the same draw.

`secure_key()` reads the operating system's entropy, and `secure_normal` draws Gaussian noise from
it for the secure mode of `gaussian_noise` (see there).

Every public function here runs eagerly inside a `torch.compile`d function (a compiled train
step): keys are hashed with Python's 64-bit integer arithmetic, which inductor cannot compile
(its int64 arithmetic overflows), and a draw must not depend on whether its caller is compiled.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_SPLIT_SALT = 0x6A09E667F3BCC909
Key = torch.Tensor


@torch.compiler.disable
def key(seed: int) -> Key:
    """A key from an integer seed."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed &= _MASK64
    return _from_words(_mix(seed ^ 0x5EED), _mix(seed + 0x9E3779B97F4A7C15))


@torch.compiler.disable
def secure_key() -> Key:
    """A key seeded from the operating system's entropy (os.urandom)."""
    hi, lo = np.frombuffer(os.urandom(16), dtype=np.uint64).tolist()
    return _from_words(hi, lo)


@torch.compiler.disable
def split(k: Key, num: int = 2) -> Key:
    """`num` new keys derived from `k`, stacked as a [num, 2] tensor."""
    _check_key(k)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    hi, lo = _words(k)
    # A salt of its own keeps split's children apart from every fold_in(k, data).
    return torch.stack(
        [
            _from_words(_mix(hi ^ _SPLIT_SALT ^ _mix(i)), _mix(lo + _mix(i ^ _SPLIT_SALT)))
            for i in range(num)
        ]
    )


@torch.compiler.disable
def fold_in(k: Key, data: int) -> Key:
    """A new key derived from `k` and the integer `data` (a step, a rank, an index)."""
    hi, lo = _words(k)
    data = int(data) & _MASK64
    return _from_words(_mix(hi ^ _mix(data)), _mix(lo + _mix(data ^ 0xD1B54A32D192ED03)))


@torch.compiler.disable
def generator(k: Key, device: torch.device | str = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded from `k`."""
    hi, lo = _words(k)
    gen = torch.Generator(device=device)
    gen.manual_seed(_mix(hi ^ _mix(lo)))
    return gen


@torch.compiler.disable
def seed(k: Key) -> int:
    """A non-negative 63-bit integer determined by `k`, to seed torch's own generators."""
    hi, lo = _words(k)
    return _mix(lo ^ _mix(hi ^ 0x5EED5EED)) >> 1


@torch.compiler.disable
def normal(
    k: Key,
    shape: tuple[int, ...] | torch.Size,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal draws determined by `k` (same key and device, same values)."""
    return torch.randn(tuple(shape), generator=generator(k, device), dtype=dtype, device=device)


@torch.compiler.disable
def uniform(k: Key, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Uniform [0, 1) float64 draws on the CPU determined by `k`."""
    return torch.rand(tuple(shape), generator=generator(k), dtype=torch.float64)


@torch.compiler.disable
def secure_normal(
    shape: tuple[int, ...] | torch.Size,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal draws from the OS's entropy, hardened against floating-point attacks.

    Each value is the sum of four independent float64 Box-Muller normals divided by two, as
    recommended by Holohan & Braghin (2021, "Secure random sampling in differential privacy") against
    the attack of Mironov (2012) on the low-order bits of a single floating-point Gaussian.
    """
    count = math.prod(shape)
    total = np.zeros(count, dtype=np.float64)
    for _ in range(4):
        total += _box_muller(count)
    values = torch.from_numpy(total / 2.0).reshape(tuple(shape))
    return values.to(dtype=dtype, device=device)


@torch.compiler.disable
def secure_uniform(count: int) -> torch.Tensor:
    """`count` float64 uniforms in (0, 1) from the OS's entropy (53 random bits each)."""
    return torch.from_numpy(_uniform53(count))


def _uniform53(count: int) -> np.ndarray:
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    # 53 random bits per double; (k + 0.5) / 2**53 lies strictly inside (0, 1).
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def _box_muller(count: int) -> np.ndarray:
    u1, u2 = _uniform53(2 * count).reshape(2, count)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _mix(z: int) -> int:
    """splitmix64's finaliser: a bijective 64-bit mix."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _to_signed(word: int) -> int:
    return word - (1 << 64) if word >= (1 << 63) else word


def _from_words(hi: int, lo: int) -> Key:
    return torch.tensor([_to_signed(hi), _to_signed(lo)], dtype=torch.int64)


def _words(k: Key) -> tuple[int, int]:
    _check_key(k)
    hi, lo = k.tolist()
    return hi & _MASK64, lo & _MASK64


def _check_key(k: Key) -> None:
    if not isinstance(k, torch.Tensor) or k.dtype != torch.int64 or tuple(k.shape) != (2,):
        raise TypeError(
            "a key must be an int64 tensor of shape [2] made by funcdp.random.key(seed), got "
            f"{type(k).__name__}"
            + (f" {k.dtype} {tuple(k.shape)}" if isinstance(k, torch.Tensor) else "")
        )

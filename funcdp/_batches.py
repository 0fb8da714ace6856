"""The batch types and sizes every sampler shares (`funcdp.data` re-exports the public ones).

Kept apart so that the samplers (`data`, `_cyclic_sampling`, `_user_sampling`) import it and not
each other: the imports run one way.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch


class IndexBatch(NamedTuple):
    """Indices of a Poisson batch padded to a whole number of buckets, and the mask of the real
    rows (which come first)."""

    indices: torch.Tensor
    mask: torch.Tensor


class Batch(NamedTuple):
    """A fixed-shape batch: a tuple of input tensors [B, ...] and a bool mask [B].

    `shard` is (rank, world_size) when the batch is one rank's share of a logical batch
    (`PoissonLoader(..., rank=, world_size=)`); None for a whole batch. A train step with a
    process group refuses a batch that is not its rank's shard.

    `bucket_size` is the size the sampler padded to (the batch holds a whole number of buckets,
    real rows first). An eager train step whose gradients are row-free computes the real rows
    only, whatever it is (`funcdp.ghost.capture.row_free`); other steps compute such a batch
    bucket by bucket (skipping a bucket of padding only), so every piece has the bucket's
    shape, and None computes the whole batch as one piece (unless
    `Performance(microbatch_size=)` says otherwise).
    """

    inputs: tuple[torch.Tensor, ...]
    mask: torch.Tensor
    shard: tuple[int, int] | None = None
    bucket_size: int | None = None


# The index samplers' batches are gathered into a `Batch` by hand, which need not say its bucket,
# so their default is one that a batch exceeds with negligible probability. The loaders pass the
# bucket on (`Batch.bucket_size`) and a step computes a batch one bucket at a time (an eager one
# whose gradients are row-free, the real rows only), so theirs is tight: at 2 sd a batch needs a
# second bucket in about one step in 40. A looser bucket computes more padding on every step, a
# tighter one a second bucket more often; at 2 sd the expected cost is within a few percent of the
# best fixed size on the benchmark models (`bench/poisson_padding.py`), and the rare second bucket
# costs little where kernels launch anyway (a GPU).
SAMPLER_SDS, LOADER_SDS = 6.0, 2.0


def default_bucket_size(
    num_examples: int, sample_rate: float, world_size: int = 1, *, sds: float = SAMPLER_SDS
) -> int:
    """A Poisson batch's padded size: its mean + `sds` standard deviations (6: exceeded with
    negligible probability), divided among `world_size` ranks. `PoissonLoader` and `UserLoader`
    take 2, as they pass the bucket on in `Batch.bucket_size`."""
    mean = num_examples * sample_rate
    sd = math.sqrt(num_examples * sample_rate * (1.0 - sample_rate))
    return math.ceil(max(1, min(num_examples, math.ceil(mean + sds * sd))) / world_size)


def padded_to_buckets(indices: torch.Tensor, bucket: int) -> IndexBatch:
    """`indices` (the sampled rows) padded to a whole number of buckets (at least one): padded
    rows point at row 0 and the mask leaves them out of every sum."""
    padded = max(bucket, math.ceil(len(indices) / bucket) * bucket)
    mask = torch.zeros(padded, dtype=torch.bool)
    mask[: len(indices)] = True
    full = torch.zeros(padded, dtype=torch.long)
    full[: len(indices)] = indices
    return IndexBatch(full, mask)


def check_counts(**counts: int | None) -> None:
    """Raises unless each count is an int >= 0 (bucket_size >= 1); None takes the default."""
    for name, value in counts.items():
        minimum = 1 if name == "bucket_size" else 0
        if value is None and name != "start":
            continue  # the default applies
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_shard(rank: int, world_size: int) -> None:
    """Raises unless world_size is an int >= 1 and rank an int in [0, world_size)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def default_steps(sample_rate: float) -> int:
    """Steps in one epoch: round(1 / sample_rate)."""
    return max(1, round(1.0 / sample_rate))


def num_examples(data: Any) -> int:
    """The number of examples of a tuple of equal-length tensors or a torch Dataset."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, (tuple, list)):
        return len(data)
    if not isinstance(data, (tuple, list)) or not data:
        raise TypeError("data must be a non-empty tuple of tensors or a torch Dataset")
    sizes = {len(t) for t in data}
    if len(sizes) != 1:
        raise ValueError(
            f"the tensors in data must share their first dimension, got sizes {sorted(sizes)}"
        )
    return sizes.pop()

"""Samplers for correlated noise: cyclic Poisson (b-min-separation) and balls-in-bins.

Both yield `IndexBatch(indices, mask)` padded to a bucket size, as `poisson_batches` does, and
draw everything from the key: the batch of step t depends only on (key, t), so resuming at
`start=t` gives the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

import funcdp._batches as _data
from funcdp import random as fdr
from funcdp._checks import check_sample_rate

_GROUPS, _STEPS = 0, 1  # fold_in salts: the permutation into groups, the steps' draws


def cyclic_poisson_batches(
    num_examples: int,
    sample_rate: float,
    *,
    key: torch.Tensor,
    min_separation: int,
    steps: int | None = None,
    bucket_size: int | None = None,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[_data.IndexBatch]:
    """Yields cyclic Poisson batches: b groups, group t mod b Poisson-sampled at step t.

    The examples are split into b = `min_separation` groups (sizes differing by at most one) by
    a permutation drawn from the key; at step t each example of group t mod b joins
    independently with probability q. A unit can then only join steps b apart, at most
    ceil(steps / b) of them: the participation that amplified BandMF assumes (Choquette-Choo et
    al. 2023). Account with `account(q, min_separation=b)`, and normalize by the expected batch
    size q * num_examples / b. With `world_size > 1` every rank draws the same logical batch
    and keeps every world_size-th of its examples from position `rank`, as `poisson_batches`
    does: each sampled example lands on exactly one rank.

    Args:
      num_examples: size of the data set, >= min_separation.
      sample_rate: q in (0, 1], the rate within the step's group.
      key: a `funcdp.random` key.
      min_separation: b >= 1, the number of groups (1 is `poisson_batches`' sampling).
      steps: number of batches; default b * round(1 / q) (every group's expected epoch).
      bucket_size: padded batch size; default `default_bucket_size` of the largest group, divided
        among the ranks.
      start: index of the first step to yield.
      rank: this process's rank, in [0, world_size).
      world_size: number of ranks sharing each logical batch.

    Raises:
      ValueError: an argument outside its range, raised when called.
    """
    check_sample_rate(sample_rate)
    _check_int("num_examples", num_examples, 1)
    _check_int("min_separation", min_separation, 1)
    if min_separation > num_examples:
        raise ValueError(
            f"min_separation must be <= num_examples={num_examples}, got {min_separation}"
        )
    _data.check_shard(rank, world_size)
    steps = min_separation * _data.default_steps(sample_rate) if steps is None else steps
    if bucket_size is None:
        bucket_size = default_cyclic_bucket_size(
            num_examples, sample_rate, min_separation, world_size
        )
    _data.check_counts(steps=steps, bucket_size=bucket_size, start=start)
    order = torch.argsort(fdr.uniform(fdr.fold_in(key, _GROUPS), (num_examples,)))
    groups = torch.tensor_split(order, min_separation)
    step_key = fdr.fold_in(key, _STEPS)
    shard = slice(rank, None, world_size)
    return _cyclic(groups, sample_rate, step_key, range(start, start + steps), bucket_size, shard)


def default_cyclic_bucket_size(
    num_examples: int,
    sample_rate: float,
    min_separation: int,
    world_size: int = 1,
    *,
    sds: float = _data.SAMPLER_SDS,
) -> int:
    """`cyclic_poisson_batches`' default bucket: `default_bucket_size` of its largest group."""
    largest = math.ceil(num_examples / min_separation)
    return _data.default_bucket_size(largest, sample_rate, world_size, sds=sds)


def _cyclic(groups, sample_rate, key, step_range, bucket, shard) -> Iterator[_data.IndexBatch]:
    for t in step_range:
        group = groups[t % len(groups)]
        chosen = fdr.uniform(fdr.fold_in(key, t), (len(group),)) < sample_rate
        yield _data.padded_to_buckets(group[chosen][shard], bucket)


def balls_in_bins_batches(
    num_examples: int,
    *,
    key: torch.Tensor,
    steps_per_epoch: int,
    steps: int | None = None,
    bucket_size: int | None = None,
    start: int = 0,
    allow_non_poisson: bool = False,
) -> Iterator[_data.IndexBatch]:
    """Yields balls-in-bins batches: each epoch puts every example in one random step of it.

    Epoch e assigns each example a uniformly random step of its `steps_per_epoch` steps, drawn
    from the key (Chua et al. 2024, "Balls-and-Bins Sampling for DP-SGD"), so a unit joins
    exactly one step per epoch. Its amplification is not one `dp_accounting` can compute, so,
    as with `shuffled_batches`, it is refused unless `allow_non_poisson=True`; account it with
    `account(1 / steps_per_epoch, poisson=False)` (epsilon then warns that its figure assumes
    Poisson sampling), and `correlated_noise` refuses it there.

    Raises:
      ValueError: allow_non_poisson is not True, or an argument outside its range.
    """
    if allow_non_poisson is not True:
        raise ValueError(
            "balls-in-bins batches are not Poisson samples, whose amplification the accountant "
            "assumes; pass allow_non_poisson=True (and account(..., poisson=False)) to use them"
        )
    _check_int("num_examples", num_examples, 1)
    _check_int("steps_per_epoch", steps_per_epoch, 1)
    steps = steps_per_epoch if steps is None else steps
    rate = 1.0 / steps_per_epoch
    if bucket_size is None:
        bucket_size = _data.default_bucket_size(num_examples, rate)
    _data.check_counts(steps=steps, bucket_size=bucket_size, start=start)
    fdr.fold_in(key, 0)  # validates the key
    return _bins(num_examples, key, steps_per_epoch, range(start, start + steps), bucket_size)


def _bins(num_examples, key, per_epoch, step_range, bucket) -> Iterator[_data.IndexBatch]:
    bins, bins_epoch = None, None
    for t in step_range:
        epoch, position = divmod(t, per_epoch)
        if epoch != bins_epoch:
            draws = fdr.uniform(fdr.fold_in(key, epoch), (num_examples,))
            bins, bins_epoch = (draws * per_epoch).long().clamp(max=per_epoch - 1), epoch
        yield _data.padded_to_buckets((bins == position).nonzero().flatten(), bucket)


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

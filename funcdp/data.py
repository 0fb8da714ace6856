"""Poisson sampling with fixed shapes: padded batches and a mask of the real rows.

Privacy amplification by subsampling, which the accountant assumes, holds when every example
joins each batch independently with probability q. The realised batch size is then random; to
keep tensor shapes fixed, each batch is padded to a bucket size and carries a boolean mask. A
batch is never truncated: one larger than the bucket is padded to the next multiple of it. The
loaders say their bucket in each `Batch` (`bucket_size`): an eager train step whose gradients
are row-free computes the real rows only, and other steps compute a batch one bucket at a time,
so every piece keeps one shape; as they need not pad for rare large batches, their bucket is
tight (mean + 2 sd, against the samplers' mean + 6 sd).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from funcdp import random as fdr
from funcdp._batches import LOADER_SDS
from funcdp._batches import Batch as Batch
from funcdp._batches import IndexBatch as IndexBatch
from funcdp._batches import check_counts as _check_counts
from funcdp._batches import check_shard as _check_shard
from funcdp._batches import default_bucket_size as default_bucket_size
from funcdp._batches import default_steps as default_steps
from funcdp._batches import num_examples as _num_examples
from funcdp._batches import padded_to_buckets as _padded_to_buckets
from funcdp._checks import check_sample_rate
from funcdp._cyclic_sampling import balls_in_bins_batches as balls_in_bins_batches
from funcdp._cyclic_sampling import cyclic_poisson_batches as cyclic_poisson_batches
from funcdp._user_sampling import UserIndexBatch as UserIndexBatch
from funcdp._user_sampling import UserLoader as UserLoader
from funcdp._user_sampling import user_batches as user_batches


def poisson_batches(
    num_examples: int,
    sample_rate: float,
    *,
    key: torch.Tensor | None,
    steps: int | None = None,
    bucket_size: int | None = None,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    secure: bool = False,
) -> Iterator[IndexBatch]:
    """Yields Poisson batches of indices into a data set of `num_examples` examples.

    The batch of step t is drawn from `fold_in(key, t)`, so it depends only on the key and t:
    resuming at `start=t` gives the batches an uninterrupted run would have seen. With
    `world_size > 1`, every rank draws the same logical batch and keeps every world_size-th of its
    examples from position `rank`: each sampled example lands on exactly one rank.

    Args:
      num_examples: size of the data set.
      sample_rate: probability q that an example joins a batch, in (0, 1].
      key: a `funcdp.random` key (None with `secure=True`).
      steps: number of batches; default one epoch, round(1 / q).
      bucket_size: padded batch size; default `default_bucket_size(num_examples, q)`.
      start: index of the first step to yield.
      rank: this process's rank, in [0, world_size).
      world_size: number of ranks sharing each logical batch; the default bucket is divided
        among them.
      secure: draw each example's inclusion from the operating system's entropy instead of
        the key (for training whose privacy must not rest on a seeded generator); the batches
        are then not reproducible, and with several ranks each would draw its own, so it is
        refused there.

    Raises:
      ValueError: sample_rate outside (0, 1], num_examples < 1, steps or start < 0,
        bucket_size < 1, or rank outside [0, world_size), raised when called, before any batch
        is drawn.
    """
    check_sample_rate(sample_rate)
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    steps = default_steps(sample_rate) if steps is None else steps
    _check_shard(rank, world_size)
    if secure and world_size > 1:
        raise ValueError("secure=True needs world_size 1: ranks cannot share an OS-entropy draw")
    if bucket_size is None:
        bucket_size = default_bucket_size(num_examples, sample_rate, world_size)
    _check_counts(steps=steps, bucket_size=bucket_size, start=start)
    if not secure:
        fdr.fold_in(key, 0)  # validates the key now, not at the first batch
    steps_range = range(start, start + steps)
    draw = _secure_draw if secure else _keyed_draw
    return _generate(
        num_examples, sample_rate, key, steps_range, bucket_size, rank, world_size, draw
    )


def _keyed_draw(key: torch.Tensor, t: int, num_examples: int) -> torch.Tensor:
    return fdr.uniform(fdr.fold_in(key, t), (num_examples,))


def _secure_draw(key: torch.Tensor, t: int, num_examples: int) -> torch.Tensor:
    del key, t
    return fdr.secure_uniform(num_examples)


def _generate(
    num_examples: int,
    sample_rate: float,
    key: torch.Tensor,
    step_range: range,
    bucket: int,
    rank: int,
    world_size: int,
    draw,
) -> Iterator[IndexBatch]:
    for t in step_range:
        chosen = draw(key, t, num_examples) < sample_rate
        yield _padded_to_buckets(chosen.nonzero().flatten()[rank::world_size], bucket)


def shuffled_batches(
    num_examples: int,
    batch_size: int,
    *,
    key: torch.Tensor,
    steps: int | None = None,
    allow_non_poisson: bool = False,
) -> Iterator[IndexBatch]:
    """Yields fixed-size batches of a shuffled data set: NOT Poisson sampling.

    The accountant's amplification by subsampling assumes Poisson sampling; these batches do not
    have it, so they are refused unless `allow_non_poisson=True`. Account them with
    `account(batch_size / num_examples, poisson=False)`, so that `epsilon` warns that its figure
    assumes Poisson sampling. Epoch e is a permutation drawn from `fold_in(key, e)`; a final
    partial batch is padded and masked, so every batch has `batch_size` rows.

    Raises:
      ValueError: allow_non_poisson is not True, or bad sizes.
    """
    if allow_non_poisson is not True:
        raise ValueError(
            "shuffled fixed-size batches break the Poisson sampling the accountant assumes; pass "
            "allow_non_poisson=True (and account(..., poisson=False)) to use them anyway"
        )
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= num_examples:
        raise ValueError(f"batch_size must be an int in [1, {num_examples}], got {batch_size!r}")
    per_epoch = math.ceil(num_examples / batch_size)
    steps = per_epoch if steps is None else steps
    _check_counts(steps=steps)
    fdr.fold_in(key, 0)  # validates the key
    return _shuffled(num_examples, batch_size, key, steps, per_epoch)


def _shuffled(num_examples, batch_size, key, steps, per_epoch) -> Iterator[IndexBatch]:
    order = None
    for t in range(steps):
        epoch, position = divmod(t, per_epoch)
        if position == 0:
            order = torch.argsort(fdr.uniform(fdr.fold_in(key, epoch), (num_examples,)))
        chosen = order[position * batch_size : (position + 1) * batch_size]
        mask = torch.zeros(batch_size, dtype=torch.bool)
        mask[: len(chosen)] = True
        indices = torch.zeros(batch_size, dtype=torch.long)
        indices[: len(chosen)] = chosen
        yield IndexBatch(indices, mask)


class PoissonLoader:
    """Iterates `Batch(inputs, mask)` of Poisson-sampled, padded batches of a data set.

    `data` is a tuple of tensors sharing their first dimension, or a `torch.utils.data.Dataset`
    whose items are tuples of tensors. One iteration is `steps` batches (default one epoch).
    Iterating again continues with new batches; `start` skips steps for resuming. With
    `world_size > 1` each rank gets its shard of the same logical batch, and with `secure=True`
    membership is drawn from the OS's entropy (see `poisson_batches`). Batches are padded to a
    whole number of buckets of `bucket_size` rows (default mean + 2 sd, per rank), which each
    batch carries, so that a train step that needs pieces of one shape (compiled, or with
    gradients that are not row-free) computes it one bucket at a time.
    """

    def __init__(
        self,
        data: Sequence[torch.Tensor] | torch.utils.data.Dataset,
        sample_rate: float,
        *,
        key: torch.Tensor | None,
        steps: int | None = None,
        bucket_size: int | None = None,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        secure: bool = False,
    ) -> None:
        check_sample_rate(sample_rate)
        _check_counts(steps=steps, bucket_size=bucket_size, start=start)
        _check_shard(rank, world_size)
        if not secure:
            fdr.fold_in(key, 0)  # validates the key
        self.data = data
        self.num_examples = _num_examples(data)
        self.sample_rate = float(sample_rate)
        self.key = key
        self.steps = default_steps(sample_rate) if steps is None else steps
        self.bucket_size = bucket_size or default_bucket_size(
            self.num_examples, self.sample_rate, world_size, sds=LOADER_SDS
        )
        self.next_step = start
        self.rank, self.world_size, self.secure = rank, world_size, secure

    @property
    def expected_batch_size(self) -> float:
        """q times the data set size (of the logical batch, over all ranks): what `normalize`
        divides by."""
        return self.sample_rate * self.num_examples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        batches = poisson_batches(
            self.num_examples,
            self.sample_rate,
            key=self.key,
            steps=self.steps,
            bucket_size=self.bucket_size,
            start=self.next_step,
            rank=self.rank,
            world_size=self.world_size,
            secure=self.secure,
        )
        for index_batch in batches:
            self.next_step += 1
            inputs = _gather(self.data, index_batch.indices)
            yield Batch(inputs, index_batch.mask, (self.rank, self.world_size), self.bucket_size)


def _gather(data: Any, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if isinstance(data, (tuple, list)):
        return tuple(t[indices] for t in data)
    items = [data[i] for i in indices.tolist()]
    items = [item if isinstance(item, (tuple, list)) else (item,) for item in items]
    return tuple(torch.stack([torch.as_tensor(x[j]) for x in items]) for j in range(len(items[0])))

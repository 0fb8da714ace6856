"""User-level Poisson sampling: the unit of privacy is a user (or any group of rows).

Each user joins a batch independently with probability q; a sampled user contributes at most k
of its rows, chosen at random when it has more. Shapes are fixed: a batch is [U, k] indices,
padded with a mask at both levels, `mask` [U] for the real users and `rows` [U, k] for the real
rows of each real user (a padded user has no real rows). Grouping rows by `user_ids =
arange(N) // k` makes "one unit = a group of k examples".
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from funcdp import random as fdr
from funcdp._batches import LOADER_SDS, Batch, default_bucket_size, default_steps
from funcdp._batches import check_counts as _check_counts
from funcdp._batches import num_examples as _num_examples
from funcdp._checks import check_sample_rate


class UserIndexBatch(NamedTuple):
    """A Poisson batch of users.

    Attributes:
      indices: long [U, k], row indices into the data set (padding points at row 0).
      mask: bool [U], the real (sampled) users.
      rows: bool [U, k], the real rows of each real user; all false for a padded user.
    """

    indices: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor


class _Users(NamedTuple):
    """Rows grouped by user: where each user's rows start in user order, how many it has, and
    the user (0..users-1, in sorted id order) of each row."""

    starts: torch.Tensor
    counts: torch.Tensor
    user_of_row: torch.Tensor


def user_batches(
    user_ids: torch.Tensor,
    sample_rate: float,
    *,
    key: torch.Tensor,
    max_examples_per_user: int,
    steps: int | None = None,
    bucket_size: int | None = None,
    start: int = 0,
) -> Iterator[UserIndexBatch]:
    """Yields Poisson batches of users, each with up to `max_examples_per_user` of its rows.

    The batch of step t is drawn from `fold_in(key, t)`: which users join (each with
    probability q, independently) and which k rows a user with more than k rows contributes
    (a uniformly random subset, drawn anew each step). Clipping each user's gradient at C then
    bounds a whole user's contribution by C, and `account(sample_rate=q)` takes the user rate.

    Args:
      user_ids: int tensor [N], the user of each row (any integer ids).
      sample_rate: probability q that a user joins a batch, in (0, 1].
      key: a `funcdp.random` key.
      max_examples_per_user: k >= 1, the most rows a sampled user contributes to a batch.
      steps: number of batches; default one epoch over users, round(1 / q).
      bucket_size: padded number of users U (a batch holds a whole number of buckets); default
        the user count's mean + 6 sd (`UserLoader`'s: 2 sd).
      start: index of the first step (for resuming).

    Raises:
      ValueError: an argument outside its range (named in the message), raised when called.
    """
    check_sample_rate(sample_rate)
    users = _group(user_ids)
    k = max_examples_per_user
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"max_examples_per_user must be an int >= 1, got {k!r}")
    num_users = len(users.counts)
    steps = default_steps(sample_rate) if steps is None else steps
    bucket_size = (
        default_bucket_size(num_users, sample_rate) if bucket_size is None else bucket_size
    )
    _check_counts(steps=steps, bucket_size=bucket_size, start=start)
    fdr.fold_in(key, 0)  # validates the key now, not at the first batch
    return _generate(users, sample_rate, key, k, range(start, start + steps), bucket_size)


def _group(user_ids: torch.Tensor) -> _Users:
    if not isinstance(user_ids, torch.Tensor) or user_ids.dim() != 1 or len(user_ids) == 0:
        raise ValueError(f"user_ids must be a non-empty 1-d tensor, got {_describe(user_ids)}")
    if (
        user_ids.dtype.is_floating_point
        or user_ids.dtype.is_complex
        or user_ids.dtype == torch.bool
    ):
        raise ValueError(f"user_ids must be an integer tensor, got dtype {user_ids.dtype}")
    _, user_of_row, counts = torch.unique(user_ids.cpu(), return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return _Users(starts, counts, user_of_row)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _generate(users: _Users, sample_rate, key, k, step_range, bucket) -> Iterator[UserIndexBatch]:
    num_users = len(users.counts)
    num_rows = len(users.user_of_row)
    for t in step_range:
        user_key, row_key = fdr.split(fdr.fold_in(key, t), 2)
        chosen = (fdr.uniform(user_key, (num_users,)) < sample_rate).nonzero().flatten()
        table, real = _rows_of_users(users, fdr.uniform(row_key, (num_rows,)), k)
        padded = max(bucket, math.ceil(len(chosen) / bucket) * bucket)
        mask = torch.zeros(padded, dtype=torch.bool)
        mask[: len(chosen)] = True
        indices = torch.zeros(padded, k, dtype=torch.long)
        rows = torch.zeros(padded, k, dtype=torch.bool)
        indices[: len(chosen)] = table[chosen]
        rows[: len(chosen)] = real[chosen]
        yield UserIndexBatch(indices, mask, rows)


def _rows_of_users(users: _Users, priority: torch.Tensor, k: int):
    """Per user, the k rows of lowest priority (a uniform random subset): table [users, k] of
    row indices (0 where the user has fewer rows) and the mask of the real entries."""
    by_priority = torch.argsort(priority)
    # Stable sort by user keeps each user's rows in priority order.
    ranked = by_priority[torch.argsort(users.user_of_row[by_priority], stable=True)]
    user = users.user_of_row[ranked]
    rank = torch.arange(len(ranked)) - users.starts[user]
    keep = rank < k
    table = torch.zeros(len(users.counts), k, dtype=torch.long)
    real = torch.zeros(len(users.counts), k, dtype=torch.bool)
    table[user[keep], rank[keep]] = ranked[keep]
    real[user[keep], rank[keep]] = True
    return table, real


class UserLoader:
    """Iterates user-level batches `Batch(inputs=(*tensors [U, k, ...], rows [U, k]), mask [U])`.

    The loss of one unit is then `loss_fn(params, buffers, *one_users_tensors, rows)` (see
    `funcdp.federated.user_loss`); `make_train_step` clips each user's gradient, so the
    sensitivity is C per user. One iteration is `steps` batches (default one epoch over users);
    iterating again continues with new batches. Users are padded to a whole number of buckets
    of `bucket_size` (default mean + 2 sd), which each batch carries (`Batch.bucket_size`).
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        user_ids: torch.Tensor,
        sample_rate: float,
        *,
        key: torch.Tensor,
        max_examples_per_user: int,
        steps: int | None = None,
        bucket_size: int | None = None,
        start: int = 0,
    ) -> None:
        if not isinstance(tensors, (tuple, list)):
            raise TypeError("tensors must be a tuple of tensors sharing their first dimension")
        size = _num_examples(tuple(tensors))
        if not isinstance(user_ids, torch.Tensor) or tuple(user_ids.shape) != (size,):
            raise ValueError(
                f"user_ids must be a tensor of shape ({size},), one user id per row, got "
                f"{_describe(user_ids)}"
            )
        # Validates every argument now, before any batch is drawn.
        user_batches(
            user_ids,
            sample_rate,
            key=key,
            max_examples_per_user=max_examples_per_user,
            steps=steps,
            bucket_size=bucket_size,
            start=start,
        )
        self.tensors = tuple(tensors)
        self.user_ids = user_ids
        self.num_users = len(torch.unique(user_ids))
        self.sample_rate = float(sample_rate)
        self.key = key
        self.max_examples_per_user = max_examples_per_user
        self.steps = steps if steps is not None else default_steps(sample_rate)
        self.bucket_size = bucket_size or default_bucket_size(
            self.num_users, self.sample_rate, sds=LOADER_SDS
        )
        self.next_step = start

    @property
    def expected_batch_size(self) -> float:
        """q times the number of users: the expected number of users a batch holds."""
        return self.sample_rate * self.num_users

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        batches = user_batches(
            self.user_ids,
            self.sample_rate,
            key=self.key,
            max_examples_per_user=self.max_examples_per_user,
            steps=self.steps,
            bucket_size=self.bucket_size,
            start=self.next_step,
        )
        for batch in batches:
            self.next_step += 1
            inputs = tuple(_gather_rows(t, batch.indices, batch.rows) for t in self.tensors)
            yield Batch((*inputs, batch.rows), batch.mask, bucket_size=self.bucket_size)


def _gather_rows(tensor: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`tensor[indices]` with the padded rows set to zero: padding carries no one's data, so a
    model that mixes a unit's rows cannot read another user's row through the padding."""
    gathered = tensor[indices]
    keep = rows.reshape(*rows.shape, *([1] * (gathered.dim() - rows.dim())))
    return torch.where(keep, gathered, torch.zeros((), dtype=gathered.dtype))

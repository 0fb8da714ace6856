"""The train step's collective operations on `torch.distributed` (gloo on CPU, nccl on GPU).

One logical Poisson batch is sharded over the ranks of a process group (`poisson_batches(...,
rank=, world_size=)` gives each rank its share of the same draw). Each rank clips and sums its
shard; ONE all-reduce sums the shards together with the metric sums and two status flags; then
every rank runs the rest of the privatizer with the same key. So every rank adds the same noise
draw to the same sum: the noise enters the logical batch exactly once with standard deviation
sigma * C, every rank applies the same update, and parameters stay identical with no broadcast
after the start. Drawing the full noise on every rank (rather than a share of variance
sigma^2 C^2 / world_size on each) costs one noise draw per rank, needs no second collective, and
makes the result independent of the world size: a checkpoint resumes on any number of ranks.

If a step raises on any rank, or finds a non-finite example there, the flags carry it through
the all-reduce and every rank refuses the step, so no rank applies a half-made update. A rank
that dies makes the others' all-reduce fail at the group's timeout, also before any update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from funcdp.tree import tree_flatten, tree_map, tree_unflatten


class RankFailedError(RuntimeError):
    """Another rank failed during this step; no rank applied it."""


def all_reduce_local_sum(compute: Callable[[], Any], state: Any, group: Any) -> Any:
    """Runs `compute()` (this rank's `funcdp._local_sum.LocalSum`) and sums its total, stats and flags over `group`.

    Returns this rank's local result with `total`, `stats` and `nonfinite` replaced by the sums
    over all ranks. Raises this rank's own exception, or `RankFailedError` if another rank
    raised, after the all-reduce, so that every rank leaves the step the same way.
    """
    try:
        local, error = compute(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks hear of it
        local, error = None, exc
    leaves, spec = tree_flatten(tree_map(torch.zeros_like, state.params))
    usable = local is not None and local.total is not None
    if usable:
        leaves, spec = tree_flatten(local.total)
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32
    device = leaves[0].device if leaves else torch.device("cpu")
    stats = local.stats if usable else torch.zeros(5, dtype=dtype, device=device)
    flags = [float(local.nonfinite) if local is not None else 0.0, 1.0 if error else 0.0]
    buffer = torch.cat(
        [x.reshape(-1).to(dtype) for x in leaves]
        + [stats.to(dtype=dtype, device=device), torch.tensor(flags, dtype=dtype, device=device)]
    )
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    if error is not None:
        raise error
    if buffer[-1] > 0:
        raise RankFailedError(
            f"{int(buffer[-1])} rank(s) failed during step {state.step}; the step was refused on "
            "every rank and the state is unchanged"
        )
    total, offset = [], 0
    for leaf in leaves:
        total.append(buffer[offset : offset + leaf.numel()].reshape(leaf.shape).to(leaf.dtype))
        offset += leaf.numel()
    return local._replace(
        total=tree_unflatten(spec, total),
        stats=buffer[offset : offset + 5].to(stats.dtype),
        nonfinite=int(buffer[-2]),
    )


def broadcast_state(state: Any, group: Any = None, src: int = 0) -> Any:
    """A copy of `state` whose tensors hold rank `src`'s values, on every rank of `group`.

    Call it once before training so that every rank starts from the same parameters; the train
    step keeps them identical from then on.
    """
    leaves, spec = tree_flatten(state)
    copies = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.clone()
            dist.broadcast(leaf, src=src, group=group)
        copies.append(leaf)
    return tree_unflatten(spec, copies)


def world() -> tuple[int, int]:
    """(rank, world_size) of the default group, or (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

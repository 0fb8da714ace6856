"""Memory control for per-example gradients: pick the vmap chunk size from a memory budget.

`vmap(grad(loss), chunk_size=c)` holds, at its peak, the activations and the per-example
gradients of `c` examples at once. `auto_chunk_size` measures what ONE example costs and returns
the largest `c` whose cost fits a budget:

    cost(c) = c * (gradient bytes of one example + activation bytes of one example)

- Gradient bytes: the parameters' sizes times the gradients' element size (exact).
- Activation bytes: on CUDA, the growth of `max_memory_allocated` while one example's gradient is
  computed, less its gradient (a measurement); elsewhere, the total size of every tensor that
  one example's forward and backward create, counting none as freed (an upper bound, so the
  chosen chunk errs small).

The stacked result, [B, ...] per parameter, is not part of a chunk's cost: it is the same for
every chunk size. Bound it with the train step's `microbatch_size` or with
`clipped_sum(mode="two_pass")`.

`chunk_size="auto"` (in `per_sample_grads` and `funcdp.Performance`) is `AutoChunk()`: a budget of
half the free CUDA memory of the device, or half the available RAM on the CPU. Pass
`AutoChunk(budget_bytes=...)` or `AutoChunk(fraction=...)` for another budget.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.func import grad
from torch.utils._python_dispatch import TorchDispatchMode

from funcdp.tree import tree_leaves


class AutoChunk(NamedTuple):
    """Asks for the largest vmap chunk under a memory budget.

    Attributes:
      budget_bytes: the budget in bytes; None takes `fraction` of the free memory of the device.
      fraction: share of the free memory used when `budget_bytes` is None, in (0, 1].
    """

    budget_bytes: int | None = None
    fraction: float = 0.5


ChunkSize = int | str | AutoChunk | None


def check_chunk_option(chunk_size: Any) -> None:
    """Raises unless chunk_size is None, a positive int, "auto" or a valid `AutoChunk`."""
    if chunk_size is None or chunk_size == "auto":
        return
    if isinstance(chunk_size, AutoChunk):
        budget, fraction = chunk_size
        if budget is not None and (
            not isinstance(budget, int) or isinstance(budget, bool) or budget < 1
        ):
            raise ValueError(
                f"AutoChunk.budget_bytes must be a positive int or None, got {budget!r}"
            )
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"AutoChunk.fraction must be in (0, 1], got {fraction!r}")
        return
    check_chunk_size(chunk_size, ' (or "auto" or an AutoChunk, to pick it from a memory budget)')


def check_chunk_size(chunk_size: Any, hint: str = "") -> None:
    """Raises unless chunk_size is None or a positive int; `hint` ends the message."""
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}{hint}")


def is_auto(chunk_size: Any) -> bool:
    """Whether `chunk_size` asks for automatic selection ("auto" or an `AutoChunk`)."""
    return isinstance(chunk_size, AutoChunk) or (
        isinstance(chunk_size, str) and chunk_size == "auto"
    )


def free_memory(device: torch.device | str) -> int:
    """Bytes free for new tensors on `device`: free CUDA memory, or the available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory cached by torch's allocator is free for torch's next tensors.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    return _available_ram()


def memory_budget(device: torch.device | str, spec: AutoChunk | str = "auto") -> int:
    """The budget in bytes that `spec` ("auto" or an `AutoChunk`) gives on `device`."""
    spec = AutoChunk() if not isinstance(spec, AutoChunk) else spec
    if spec.budget_bytes is not None:
        return spec.budget_bytes
    return int(free_memory(device) * spec.fraction)


class ExampleCost(NamedTuple):
    """Bytes that one example adds to a vmap chunk.

    Attributes:
      gradient_bytes: its per-example gradient, all parameters together.
      activation_bytes: its activations and the temporaries of its backward.
      measured: True if activation_bytes was measured (CUDA), False if it is an upper bound.
    """

    gradient_bytes: int
    activation_bytes: int
    measured: bool

    @property
    def total(self) -> int:
        """gradient_bytes + activation_bytes."""
        return self.gradient_bytes + self.activation_bytes


def example_cost(loss_fn: Callable[..., torch.Tensor], params: Any, *example: Any) -> ExampleCost:
    """Measures the memory that one example's gradient of `loss_fn(params, *example)` needs.

    Args:
      loss_fn: the scalar loss of ONE example.
      params: the tree differentiated.
      *example: ONE example's inputs (no batch dimension).

    On CUDA this resets the device's peak-memory statistics.
    """
    leaves = [p for p in tree_leaves(params) if isinstance(p, torch.Tensor)]
    gradient_bytes = sum(p.numel() * p.element_size() for p in leaves)
    device = leaves[0].device if leaves else torch.device("cpu")
    # The probe draws from the global generators (dropout): fork them so it changes no later draw.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _probe(grad(loss_fn), params, example, gradient_bytes, device)


def _probe(gradient, params, example, gradient_bytes: int, device: torch.device) -> ExampleCost:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = gradient(params, *example)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return ExampleCost(gradient_bytes, max(peak - gradient_bytes, 0), True)
    with _AllocationCounter() as counter:
        result = gradient(params, *example)
    del result
    return ExampleCost(gradient_bytes, counter.bytes, False)


@torch.compiler.disable  # a measurement: it runs eagerly inside a compiled step
def auto_chunk_size(
    loss_fn: Callable[..., torch.Tensor],
    params: Any,
    *batch: torch.Tensor,
    spec: AutoChunk | str = "auto",
) -> int:
    """The largest chunk of `batch` whose per-example gradients and activations fit the budget.

    Args:
      loss_fn: `loss_fn(params, *example)`, the scalar loss of ONE example.
      params: the tree differentiated.
      *batch: the batch, each with a leading dimension B >= 1; its first row is the probe.
      spec: "auto" or an `AutoChunk` giving the budget.

    Returns:
      An int in [1, B]: 1 when even one example passes the budget (it cannot go lower).
    """
    chunk = examples_in_budget(loss_fn, params, *batch, spec=spec)  # checks the batch first
    return min(batch[0].shape[0], chunk)


def examples_in_budget(
    loss_fn: Callable[..., torch.Tensor],
    params: Any,
    *batch: torch.Tensor,
    spec: AutoChunk | str = "auto",
) -> int:
    """How many examples' per-example gradients and activations fit the budget (at least 1;
    `sys.maxsize` when an example allocates nothing), measured on the batch's first row: the
    chunk of any batch of rows shaped like it, up to its size. The train step measures once per
    row shape, however many rows each batch has."""
    check_chunk_option(spec)
    if not batch or batch[0].dim() == 0 or batch[0].shape[0] < 1:
        raise ValueError("auto_chunk_size needs a batch with at least one row")
    leaves = [p for p in tree_leaves(params) if isinstance(p, torch.Tensor)]
    device = leaves[0].device if leaves else batch[0].device
    budget = memory_budget(device, spec)
    cost = example_cost(loss_fn, params, *(x[0] for x in batch))
    return chunk_for_budget(cost.total, budget, sys.maxsize)


def chunk_for_budget(example_bytes: int, budget_bytes: int, batch_size: int) -> int:
    """max c in [1, batch_size] with c * example_bytes <= budget_bytes (1 if none fits)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if example_bytes <= 0:
        return batch_size
    return max(1, min(batch_size, budget_bytes // example_bytes))


class _AllocationCounter(TorchDispatchMode):
    """Adds up the bytes of every tensor an operation creates (frees are not subtracted).

    An output that shares its storage with an input (a view, an in-place result) creates
    nothing and is not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_ptr(t) for t in _tensors((args, tuple(kwargs.values())))}
        for t in _tensors(out):
            if _storage_ptr(t) not in inputs:
                self.bytes += t.untyped_storage().nbytes()
        return out


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

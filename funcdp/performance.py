"""`Performance`: how a train step computes, never what it releases.

Every option here changes speed and memory only: the step gives the same parameters, up to float
rounding, whatever they are set to (tests compare each setting with the default). What changes
the privacy guarantee (the privatizer, `on_nonfinite`, `process_group`) is an argument of
`make_train_step` of its own, so the two cannot be confused (as jax_privacy's `PerformanceFlags`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Literal, NamedTuple

import torch

from funcdp.memory import ChunkSize, check_chunk_option

Mode = Literal["auto", "vmap", "ghost", "two_pass"]


class Performance(NamedTuple):
    """Speed and memory settings of a train step.

    Attributes:
      mode: "vmap" forms every example's gradient (any module, any per-example transform);
        "ghost" forms none for linear, conv, embedding and normalization parameters: their
        norms and clipped sum come from one batched backward (`funcdp.ghost`), and the other
        parameters' from vmap. It needs the privatizer to start with one stateless clipping
        transform and `aggregate()`. "auto" (the default) is "ghost" where that holds and
        "vmap" otherwise. Ghost mode's certified norms may exceed vmap's by up to 2^-10
        (relative, on large ops), the bound on the rounding of its Gram form. "two_pass" (same
        privatizers as "ghost") computes the per-example gradients chunk by chunk twice, norms
        first and then the scaled sums, so memory holds one chunk's gradients (`chunk_size`,
        default 32); the loss must be deterministic (random layers raise).
      chunk_size: vmap at most this many examples at once (bounds activation memory); "auto"
        or a `funcdp.memory.AutoChunk` picks the largest chunk under a memory budget, measured
        once per example shape (in ghost mode: for the vmapped parameters only). A last chunk
        that the micro-batch does not fill is padded to the chunk's shape.
      microbatch_size: split the batch into micro-batches of this many rows, each clipped and
        summed before the next is differentiated (bounds per-example gradient memory). An eager
        step whose gradients are row-free (`funcdp.ghost.capture.row_free`) computes the real
        rows only, in micro-batches of this size (the last one shorter) or at once. Other steps
        (compiled ones included) compute a batch that carries its bucket (`Batch.bucket_size`,
        from the loaders) one bucket at a time, or in pieces of the smaller of the two; every
        such piece has one shape (the last one padded), and a piece of padding only is skipped.
      autocast_dtype: None, torch.bfloat16 or torch.float16: run the loss (forward and
        backward) under `torch.autocast` in that dtype. Losses, gradients (in ghost mode each
        op's input and output gradient) are widened to float32 before clipping, so norms, noise
        and the optimizer are float32.
      compile: `torch.compile` the step's tensor work: the per-example gradients (or the ghost
        pass), clipping and summation of each piece, and the optimizer's update. True for
        the defaults, or a dict of `torch.compile` keyword arguments. Keys, noise, accounting,
        the collective of a process group and the chunk measurement stay eager, so a key's noise
        does not depend on compilation. The first step runs the clipped sum eagerly (the ghost
        probe runs there) and the second compiles it, as one graph that every piece of one
        shape reuses; a piece of a new shape compiles on its first use. Inside
        a compiled graph the rare exact paths of certified clipping (examples whose float32
        norm cannot be certified tightly) are not taken: such an example keeps its looser
        certified bound, so it is clipped harder than in eager mode.
    """

    mode: Mode = "auto"
    chunk_size: ChunkSize = None
    microbatch_size: int | None = None
    autocast_dtype: torch.dtype | None = None
    compile: bool | dict[str, Any] = False

    def check(self) -> Performance:
        """Returns self, or raises ValueError naming the first bad field."""
        if self.mode not in ("auto", "vmap", "ghost", "two_pass"):
            raise ValueError(
                f'mode must be "auto", "vmap", "ghost" or "two_pass", got {self.mode!r}'
            )
        check_chunk_option(self.chunk_size)
        size = self.microbatch_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"microbatch_size must be a positive int or None, got {size!r}")
        if self.autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                "autocast_dtype must be None, torch.bfloat16 or torch.float16, got "
                f"{self.autocast_dtype!r}"
            )
        if not isinstance(self.compile, (bool, dict)):
            raise ValueError(
                f"compile must be a bool or a dict of torch.compile options, got {self.compile!r}"
            )
        return self


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_memory` sets; some glibc
# versions refuse an mmap threshold above 32 MiB (half their largest heap on 64-bit).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLDS = (1 << 30, 1 << 25)
_KEEP = ((_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 1 << 28))


def keep_freed_memory() -> bool:
    """Asks glibc's malloc to keep the memory a step frees for the next step, for the whole
    process; returns whether it could (False, changing nothing, where the C library is not
    glibc).

    A CPU step allocates and frees the same large temporaries every time. glibc maps large
    blocks fresh and trims its heap, so each step page-faults that memory in again: on this
    project's CPU 8,000 to 12,000 faults per step of the benchmark CNN, about a quarter of its
    time (bench/RESULTS.md). This serves blocks up to 1 GiB (32 MiB where glibc allows no
    more) from the heap and trims only above 1 GiB free: the peak memory is the same, but
    memory a step frees is not given back to the system until the process exits. Speed only,
    like every `Performance` setting; the environment variables `MALLOC_MMAP_THRESHOLD_` and
    `MALLOC_TRIM_THRESHOLD_` do the same for a process from its start.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or not glibc's
        return False
    if not any(mallopt(_M_MMAP_THRESHOLD, value) == 1 for value in _MMAP_THRESHOLDS):
        return False
    return all(mallopt(option, value) == 1 for option, value in _KEEP)

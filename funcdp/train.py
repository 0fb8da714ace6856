"""The train state and the pure DP-SGD step built from a loss, a privatizer and an optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import optree
import torch

from funcdp import random as fdr
from funcdp._checks import check_mask
from funcdp.accounting.ledger import Ledger
from funcdp.data import Batch
from funcdp.distributed import all_reduce_local_sum
from funcdp.memory import ChunkSize, auto_chunk_size, check_chunk_option, is_auto
from funcdp.microbatch import autocast_loss, ghost_rule, ghost_sum_fn, per_example_fn
from funcdp.optim import apply_updates
from funcdp.transforms.accounting import AccountState
from funcdp.transforms.base import GradientTransformation, split_at_reduce
from funcdp.tree import tree_add, tree_map, zero_rows

Metrics = dict[str, Any]


class _LocalSum(NamedTuple):
    """This process's share of a step: the sum through aggregate(), and what the metrics need.

    `nonfinite` counts real examples refused in "raise"/"skip" mode; then total and stats are
    None and the step is refused.
    """

    total: Any
    pre_state: tuple
    stats: torch.Tensor | None
    nonfinite: int


OnNonFinite = Literal["raise", "skip", "zero"]


class NonFiniteError(FloatingPointError):
    """A real example of the batch has a non-finite loss or gradient; nothing was changed."""


class TrainState(NamedTuple):
    """Everything a step reads and writes, as one pytree that `torch.save` can write.

    Attributes:
      params: trainable parameters, keyed as in `named_parameters()`.
      buffers: buffers (and nothing else), keyed as in `named_buffers()`.
      opt_state: the optimizer's state.
      privacy_state: the privatizer's state (a tuple, one entry per transform of the chain).
      key: the run's key; the step's randomness is `fold_in(key, step)`.
      step: the number of steps taken.
    """

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: Any
    privacy_state: Any
    key: torch.Tensor
    step: int

    @classmethod
    def create(
        cls,
        params: dict[str, torch.Tensor],
        *,
        buffers: dict[str, torch.Tensor] | None = None,
        privatizer: GradientTransformation,
        optimizer: GradientTransformation,
        key: torch.Tensor,
    ) -> TrainState:
        """The state before the first step: initial optimizer and privacy states, step 0."""
        fdr.fold_in(key, 0)  # validates the key
        return cls(
            params=dict(params),
            buffers=dict(buffers or {}),
            opt_state=optimizer.init(params),
            privacy_state=privatizer.init(params),
            key=key,
            step=0,
        )

    @property
    def ledger(self) -> Ledger:
        """The privacy ledger kept by the privatizer's `account` transform."""
        accounts = optree.tree_leaves(
            self.privacy_state, is_leaf=lambda node: isinstance(node, AccountState)
        )
        accounts = [a for a in accounts if isinstance(a, AccountState)]
        if len(accounts) != 1:
            raise ValueError(
                f"the privatizer must hold exactly one account(sample_rate) transform to keep a "
                f"ledger, found {len(accounts)}"
            )
        return accounts[0].ledger


def make_train_step(
    loss_fn: Callable[..., torch.Tensor],
    privatizer: GradientTransformation,
    optimizer: GradientTransformation,
    *,
    chunk_size: ChunkSize = None,
    microbatch_size: int | None = None,
    on_nonfinite: OnNonFinite = "raise",
    process_group: Any = None,
    autocast_dtype: torch.dtype | None = None,
    compile: bool | dict[str, Any] = False,
    mode: Literal["auto", "vmap", "ghost"] = "auto",
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the pure DP-SGD step `step(state, batch) -> (state, metrics)`.

    Per micro-batch, the per-example gradients of `loss_fn` go through the privatizer up to and
    including `aggregate()`; the sums are added, and the rest of the privatizer (noise,
    normalization, accounting) runs once per logical batch. The optimizer then updates the
    parameters. The input state is never modified.

    Args:
      loss_fn: `loss_fn(params, buffers, *example)`, the scalar loss of ONE example.
      privatizer: a `chain(clip(...), aggregate(), gaussian_noise(...), normalize(...),
        account(...))` or any chain with an `aggregate()`.
      optimizer: a transform from `funcdp.optim`.
      chunk_size: vmap at most this many examples at once (bounds activation memory);
        "auto" or a `funcdp.memory.AutoChunk` picks the largest chunk under a memory budget,
        measured once per micro-batch shape.
      microbatch_size: split the batch into micro-batches of this many rows, each clipped and
        summed before the next is differentiated (bounds per-example gradient memory).
      on_nonfinite: what to do with a real example whose loss or gradient norm is not finite.
        "raise": raise `NonFiniteError`, state unchanged. "skip": return the state unchanged
        with `metrics["skipped"]` true; a skipped step is visible and depends on the data, which
        the DP guarantee does not cover. "zero": the example contributes a zero gradient and is
        counted in `metrics["nonfinite"]`; this stays within the clip's bound, so the guarantee
        holds.

      process_group: a `torch.distributed` group (or `torch.distributed.group.WORLD`) over
        which one logical batch is sharded: see `funcdp.distributed`. None runs in-process.
      autocast_dtype: None, torch.bfloat16 or torch.float16: run `loss_fn` (forward and
        backward) under `torch.autocast` in that dtype. The loss and the per-example gradients
        (in ghost mode: each op's input and output gradient) are cast to float32 before
        clipping, so norms, noise and the optimizer are float32.
      compile: `torch.compile` the step's tensor work, in both modes: the per-example
        gradients (or the ghost pass), clipping and summation of each micro-batch, and the
        optimizer's update. True for the defaults, or a dict of `torch.compile` keyword
        arguments. Key derivation, the noise, accounting, the collective of `process_group` and
        the chunk_size="auto" measurement stay eager: keys are hashed in Python (which inductor
        cannot compile), the ledger is Python data, and a key's noise must not depend on
        compilation, so the compiled step adds the eager step's noise. The first step of each
        new batch shape pays the compile time. The compiled step gives the eager step's
        parameters up to float rounding; random layers (dropout) draw from torch's compiled
        RNG, so their masks differ from the eager ones.

      mode: "vmap" forms every example's gradient (any module, any per-example transform);
        "ghost" forms none for linear, conv, embedding and normalization parameters: their
        norms and clipped sum come from one batched backward (`funcdp.ghost`), and the other
        parameters' from vmap. It needs the privatizer to start with one stateless clipping
        transform and `aggregate()`; in it, chunk_size="auto" sizes the chunks of the vmapped
        parameters' gradients only. "auto" (the default) is "ghost" where those hold and "vmap"
        otherwise; both give the same parameters up to float rounding.

    Returns:
      `step(state, batch)`. Its metrics (loss, clipped_fraction, grad_norm, batch_size,
      nonfinite, skipped) are computed from the private batch WITHOUT noise: use them for
      monitoring, do not release them. One step function (and one model) per thread:
      `functional_call` swaps the module's tensors while it runs, so threads sharing a module
      read each other's parameters and buffers.
    """
    if on_nonfinite not in ("raise", "skip", "zero"):
        raise ValueError(f'on_nonfinite must be "raise", "skip" or "zero", got {on_nonfinite!r}')
    if microbatch_size is not None and (
        not isinstance(microbatch_size, int) or microbatch_size < 1
    ):
        raise ValueError(f"microbatch_size must be a positive int or None, got {microbatch_size!r}")
    check_chunk_option(chunk_size)
    if autocast_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(
            f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}"
        )
    if not isinstance(compile, (bool, dict)):
        raise ValueError(
            f"compile must be a bool or a dict of torch.compile options, got {compile!r}"
        )
    rule = ghost_rule(privatizer, mode)
    example_loss = autocast_loss(loss_fn, autocast_dtype)
    ghost_sum = None if rule is None else ghost_sum_fn(rule, example_loss, chunk_size, on_nonfinite)
    per_example = per_example_fn(example_loss, autocast_dtype is not None)
    chosen_chunks: dict[tuple, int] = {}  # chunk_size="auto": by micro-batch shapes
    through_sum, after_sum, split = split_at_reduce(privatizer)
    clip_norm = privatizer.sensitivity

    if process_group is not None and through_sum.finish is not None:
        raise ValueError(
            "a privatizer whose per-example part keeps batch statistics (adaptive clipping) is "
            "not supported with process_group yet: its statistics would need their own all-reduce"
        )

    def chunk_for(state: TrainState, rows: tuple[torch.Tensor, ...]) -> int | None:
        if not is_auto(chunk_size):
            return chunk_size
        shapes = tuple((tuple(x.shape), x.dtype) for x in rows)
        if shapes not in chosen_chunks:
            probe = lambda params, *example: example_loss(params, state.buffers, *example)  # noqa: E731
            chosen_chunks[shapes] = auto_chunk_size(probe, state.params, *rows, spec=chunk_size)
        return chosen_chunks[shapes]

    def local_sum(state: TrainState, inputs, mask: torch.Tensor, step_key) -> _LocalSum:
        size = mask.shape[0]
        micro = microbatch_size or size
        total, losses, norms, finite = None, [], [], []
        pre_state = state.privacy_state[:split]
        for start in range(0, size, micro):
            rows = slice(start, start + micro)
            part = tuple(x[rows] for x in inputs)
            if ghost_sum is not None:
                summed, loss, norm = ghost_sum(state, part, mask[rows])
            else:
                grads, loss, norm = per_example(
                    state.params, state.buffers, chunk_for(state, part), *part
                )
            ok = (torch.isfinite(loss) & torch.isfinite(norm)) | ~mask[rows].to(loss.device)
            if on_nonfinite != "zero" and not bool(ok.all()):
                return _LocalSum(None, pre_state, None, int((~ok).sum()))
            if ghost_sum is None:
                if on_nonfinite == "zero":
                    grads = tree_map(lambda g, keep=ok: zero_rows(g, keep), grads)
                summed, pre_state = through_sum.update(
                    grads, pre_state, state.params, key=step_key, mask=mask[rows]
                )
            total = summed if total is None else tree_add(total, summed)
            losses.append(loss)
            norms.append(norm)
            finite.append(ok)
        stats = _stats(torch.cat(losses), torch.cat(norms), mask, torch.cat(finite), clip_norm)
        return _LocalSum(total, pre_state, stats, 0)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        inputs, mask = _check_batch(batch)
        step_key = fdr.fold_in(state.key, state.step)
        if process_group is None:
            local = local_sum(state, inputs, mask, step_key)
        else:
            local = all_reduce_local_sum(
                lambda: local_sum(state, inputs, mask, step_key), state, process_group
            )
        if local.nonfinite:
            if on_nonfinite == "skip":
                return state, _skipped_metrics(mask, found=local.nonfinite)
            raise NonFiniteError(
                f"step {state.step}: {local.nonfinite} real example(s) have a non-finite loss or "
                "gradient; the state is unchanged (on_nonfinite='zero' drops them privately)"
            )
        pre_state = local.pre_state
        if through_sum.finish is not None:  # per-example statistics close once per batch
            pre_state = through_sum.finish(pre_state, key=step_key)
        private, post_state = after_sum.update(
            local.total, state.privacy_state[split:], state.params, key=step_key
        )
        params, opt_state = optimize(private, state.opt_state, state.params)
        new_state = state._replace(
            params=params,
            opt_state=opt_state,
            privacy_state=(*pre_state, *post_state),
            step=state.step + 1,
        )
        return new_state, _metrics(local.stats)

    def optimize(private, opt_state, params):
        updates, opt_state = optimizer.update(private, opt_state, params)
        return apply_updates(params, updates), opt_state

    # Compiled: the tensor work (step calls these two by name); keys, noise and ledger stay eager.
    if compile is not False:
        options = {} if compile is True else compile
        local_sum, optimize = (torch.compile(f, **options) for f in (local_sum, optimize))
    return step


def make_eval_step(
    metric_fn: Callable[..., Any], *, chunk_size: int | None = None
) -> Callable[[TrainState, Batch], dict[str, float]]:
    """Builds `eval_step(state, batch) -> {name: mean over the real rows}`.

    `metric_fn(params, buffers, *example)` returns a scalar (reported as "loss") or a dict of
    scalars for ONE example, e.g. `{"loss": ..., "accuracy": ...}`.
    """

    def as_dict(params, buffers, *example):
        values = metric_fn(params, buffers, *example)
        return values if isinstance(values, dict) else {"loss": values}

    def eval_step(state: TrainState, batch: Batch) -> dict[str, float]:
        inputs, mask = _check_batch(batch)
        with torch.no_grad():
            in_dims = (None, None) + (0,) * len(inputs)
            values = torch.func.vmap(as_dict, in_dims=in_dims, chunk_size=chunk_size)(
                state.params, state.buffers, *inputs
            )
        count = max(int(mask.sum()), 1)
        return {
            name: float(torch.where(mask, v.float(), 0.0).sum() / count)
            for name, v in values.items()
        }

    return eval_step


def _check_batch(batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    if not isinstance(batch, (Batch, tuple)) or len(batch) != 2:
        raise TypeError("batch must be a funcdp.data.Batch(inputs, mask)")
    inputs, mask = batch
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("batch.inputs must be a non-empty tuple of tensors")
    size = inputs[0].shape[0] if inputs[0].dim() else 0
    check_mask(mask, size)
    for i, x in enumerate(inputs):
        if x.dim() == 0 or x.shape[0] != size:
            raise ValueError(
                f"batch.inputs[{i}] has shape {tuple(x.shape)}, but the mask and inputs[0] have "
                f"{size} rows: every input needs the same leading (batch) dimension"
            )
    if size == 0:
        raise ValueError(
            "a batch needs at least one row (pad an empty Poisson batch with mask false)"
        )
    return tuple(inputs), mask


def _stats(
    losses: torch.Tensor,
    norms: torch.Tensor,
    mask: torch.Tensor,
    finite: torch.Tensor,
    clip_norm: float | None,
) -> torch.Tensor:
    """Sums behind the metrics, [real, counted, loss, clipped, norm], summable across ranks."""
    mask = mask.to(losses.device)
    counted = mask & finite  # real rows with a finite loss and gradient
    zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
    clipped = (norms > clip_norm) & counted if clip_norm is not None else torch.zeros_like(mask)
    return torch.stack(
        [
            mask.sum().to(losses.dtype),
            counted.sum().to(losses.dtype),
            torch.where(counted, losses, zero).sum(),
            clipped.sum().to(losses.dtype),
            torch.where(counted, norms.to(losses.dtype), zero).sum(),
        ]
    )


def _metrics(stats: torch.Tensor) -> Metrics:
    real, good, loss, clipped_count, norm = stats.tolist()  # one device sync for all metrics
    denominator = max(good, 1.0)
    return {
        "loss": loss / denominator,
        "clipped_fraction": clipped_count / denominator,
        "grad_norm": norm / denominator,
        "batch_size": int(real),
        "nonfinite": int(real - good),
        "skipped": False,
    }


def _skipped_metrics(mask: torch.Tensor, found: int) -> Metrics:
    nan = float("nan")
    return {
        "loss": nan,
        "clipped_fraction": nan,
        "grad_norm": nan,
        "batch_size": int(mask.sum()),
        "nonfinite": found,  # those found before the step was refused: at least one
        "skipped": True,
    }

"""The train state and the pure DP-SGD step built from a loss, a privatizer and an optimizer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import optree
import torch

from funcdp import random as fdr
from funcdp._checks import check_mask
from funcdp._local_sum import local_sum_fn
from funcdp._probes import note_loss_error
from funcdp.accounting.ledger import Ledger
from funcdp.data import Batch
from funcdp.distributed import all_reduce_local_sum
from funcdp.optim import apply_updates
from funcdp.performance import Performance
from funcdp.transforms.accounting import AccountState
from funcdp.transforms.base import GradientTransformation, split_at_reduce

Metrics = dict[str, Any]
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
    on_nonfinite: OnNonFinite = "raise",
    process_group: Any = None,
    performance: Performance = Performance(),
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the pure DP-SGD step `step(state, batch) -> (state, metrics)`.

    Per micro-batch, the per-example gradients of `loss_fn` go through the privatizer up to and
    including `aggregate()`; the sums are added, and the rest of the privatizer (noise,
    normalization, accounting) runs once per logical batch. The optimizer then updates the
    parameters. The input state is never modified, and the same state and batch give the same
    new state: the loss's own randomness (dropout) is drawn from the step's key.

    Args:
      loss_fn: `loss_fn(params, buffers, *example)`, the scalar loss of ONE example.
      privatizer: a `chain(clip(...), aggregate(), gaussian_noise(...), normalize(...),
        account(...))` or any chain with an `aggregate()`.
      optimizer: a transform from `funcdp.optim`.
      on_nonfinite: what to do with a real example whose loss or gradient norm is not finite.
        "raise": raise `NonFiniteError`, state unchanged. "skip": return the state unchanged
        with `metrics["skipped"]` true; a skipped step is visible and depends on the data, which
        the DP guarantee does not cover. "zero": the example contributes a zero gradient and is
        counted in `metrics["nonfinite"]`; this stays within the clip's bound, so the guarantee
        holds.
      process_group: a `torch.distributed` group (or `torch.distributed.group.WORLD`) over
        which one logical batch is sharded: see `funcdp.distributed`. Each rank's batch must be
        its shard (`PoissonLoader(..., rank=, world_size=)`). None runs in-process.
      performance: speed and memory settings (`funcdp.Performance`), which never change the
        result beyond float rounding.

    Returns:
      `step(state, batch)`, taking a `funcdp.data.Batch`. Its metrics (loss, clipped_fraction,
      grad_norm, batch_size, nonfinite, skipped) are computed from the private batch WITHOUT
      noise: use them for monitoring, do not release them. One step function (and one model)
      per thread: `functional_call` swaps the module's tensors while it runs.
    """
    if on_nonfinite not in ("raise", "skip", "zero"):
        raise ValueError(f'on_nonfinite must be "raise", "skip" or "zero", got {on_nonfinite!r}')
    if not isinstance(performance, Performance):
        raise TypeError(f"performance must be a funcdp.Performance, got {performance!r}")
    performance.check()
    split = split_at_reduce(privatizer)  # binds the chain once
    _refuse_with_process_group(split, process_group)
    local_sum = local_sum_fn(loss_fn, split, performance, on_nonfinite)

    def optimize(private, opt_state, params):
        updates, opt_state = optimizer.update(private, opt_state, params)
        return apply_updates(params, updates), opt_state

    # Compiled: the tensor work (local_sum compiles its own); keys, noise, the ledger and the
    # collective stay eager.
    if performance.compile is not False:
        options = {} if performance.compile is True else performance.compile
        optimize = torch.compile(optimize, **options)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        inputs, mask = check_batch(batch, process_group)
        step_key = fdr.fold_in(checked_state(state).key, state.step)
        example_key, loss_key = fdr.split(step_key, 2)
        compute = lambda: local_sum(  # noqa: E731
            state, inputs, mask, example_key, batch.bucket_size
        )
        with _seeded(loss_key, state.params, process_group):
            try:
                local = (
                    compute()
                    if process_group is None
                    else all_reduce_local_sum(compute, state, process_group)
                )
            except Exception as error:
                note_loss_error(error)  # where in the loss, and what to do about known causes
                raise
        if local.nonfinite:
            return _refused(state, mask, local.nonfinite, on_nonfinite)
        pre_state = local.pre_state
        if split.through_sum.finish is not None:  # per-example statistics close once per batch
            pre_state = split.through_sum.finish(pre_state, key=step_key)
        _, post_state = split.halves(state.privacy_state)
        private, post_state = split.after_sum.update(
            local.total, post_state, state.params, key=step_key
        )
        params, opt_state = optimize(private, state.opt_state, state.params)
        privacy_state = (*pre_state, *post_state)
        new_state = state._replace(
            params=params, opt_state=opt_state, privacy_state=privacy_state, step=state.step + 1
        )
        return new_state, _metrics(local.stats)

    return step


def _refuse_with_process_group(split, process_group) -> None:
    """Raises for what a process group cannot run: per-batch statistics kept by the per-example
    part (adaptive clipping), and noise from OS entropy (each rank would draw its own)."""
    if process_group is None:
        return
    if split.through_sum.finish is not None:
        raise ValueError(
            "a privatizer whose per-example part keeps batch statistics (adaptive clipping) is "
            "not supported with process_group yet: its statistics would need their own all-reduce"
        )
    if split.context.secure:
        raise ValueError(
            "gaussian_noise(secure=True) cannot run with process_group: each rank would draw its "
            "own noise from the OS's entropy, so the ranks would add different noise and hold "
            "different parameters; use secure=False (noise from the shared step key)"
        )


def _refused(state, mask, found: int, on_nonfinite: str) -> tuple[TrainState, Metrics]:
    if on_nonfinite == "skip":
        return state, _skipped_metrics(mask, found=found)
    raise NonFiniteError(
        f"step {state.step}: {found} real example(s) have a non-finite loss or "
        "gradient; the state is unchanged (on_nonfinite='zero' drops them privately)"
    )


@contextlib.contextmanager
def _seeded(key, params, process_group):
    """torch's generators seeded from `key` (folded with the rank) while the block runs, and
    restored after: random layers draw from the step key, and nothing else is disturbed."""
    if process_group is not None:
        key = fdr.fold_in(key, torch.distributed.get_rank(process_group))
    seed = fdr.seed(key)
    devices = sorted(
        {p.device.index or 0 for p in optree.tree_leaves(params) if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def checked_state(state: TrainState) -> TrainState:
    """`state`, checked: a TrainState whose step (which selects the step's noise) is an int >= 0."""
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a funcdp.TrainState, got {type(state).__name__}")
    step = state.step
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(
            f"state.step must be an int >= 0 (it selects the step's noise), got {step!r}"
        )
    return state


def make_eval_step(
    metric_fn: Callable[..., Any], *, chunk_size: int | None = None
) -> Callable[[TrainState, Batch], dict[str, float]]:
    """Builds `eval_step(state, batch) -> {name: mean over the real rows}`.

    `metric_fn(params, buffers, *example)` returns a scalar (reported as "loss") or a dict of
    scalars for ONE example, e.g. `{"loss": ..., "accuracy": ...}`.

    Evaluate a model in eval mode (`model.eval()`): its metrics are then deterministic. A model
    left in training mode runs its random layers (dropout) as the train step does, each example
    with its own draws, taken from the state's key (`split(fold_in(key, step), 3)[2]`, a key the
    train step never uses) and never from torch's global RNG: the same state and batch give the
    same metrics, and torch's generators are left as they were.
    """

    def as_dict(params, buffers, *example):
        values = metric_fn(params, buffers, *example)
        return values if isinstance(values, dict) else {"loss": values}

    def eval_step(state: TrainState, batch: Batch) -> dict[str, float]:
        inputs, mask = check_batch(batch)
        eval_key = fdr.split(fdr.fold_in(state.key, state.step), 3)[2]
        with torch.no_grad(), _seeded(eval_key, state.params, None):
            in_dims = (None, None) + (0,) * len(inputs)
            values = torch.func.vmap(
                as_dict, in_dims=in_dims, chunk_size=chunk_size, randomness="different"
            )(state.params, state.buffers, *inputs)
        count = max(int(mask.sum()), 1)
        return {
            name: float(torch.where(mask, v.float(), 0.0).sum() / count)
            for name, v in values.items()
        }

    return eval_step


def check_batch(
    batch: Batch, process_group: Any = None
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The inputs and mask of `batch`, checked: a `Batch` (never a bare tuple, whose second
    entry could be read as a mask by mistake) of equal-length inputs, shaped for this process."""
    if not isinstance(batch, Batch):
        raise TypeError(
            f"batch must be a funcdp.data.Batch(inputs, mask), got {type(batch).__name__}: wrap "
            "a tuple of tensors as Batch((x, y), mask), with mask marking the real rows"
        )
    inputs, mask = batch.inputs, batch.mask
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
    _check_shard(batch.shard, process_group)
    bucket = batch.bucket_size
    if bucket is not None and (
        not isinstance(bucket, int) or isinstance(bucket, bool) or bucket < 1
    ):
        raise ValueError(f"batch.bucket_size must be None or an int >= 1, got {bucket!r}")
    return tuple(inputs), mask


def _check_shard(shard, process_group) -> None:
    """A process group's step needs each rank's own shard; a lone process the whole batch."""
    if process_group is None:
        if shard is not None and shard[1] != 1:
            raise ValueError(
                f"batch.shard is {shard}: it is one rank's share of a logical batch, but the step "
                "has no process_group, so the shard would be treated as the whole batch"
            )
        return
    rank = torch.distributed.get_rank(process_group)
    world = torch.distributed.get_world_size(process_group)
    if shard != (rank, world):
        raise ValueError(
            f"batch.shard is {shard}, but this process is rank {rank} of {world}: build the "
            f"batches with PoissonLoader(..., rank={rank}, world_size={world}) (or "
            "poisson_batches with rank and world_size), so that each sampled example lands on "
            "exactly one rank; otherwise every rank sums the same examples and the sensitivity "
            "is world_size times the clip norm"
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

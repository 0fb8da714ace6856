"""Find what in a module breaks differential privacy or vmap, and repair what can be repaired.

`validate(module)` inspects the submodules by type; given `example_inputs` it also runs the module
(on a copy) and reports what only a run shows: buffers that change in training, ops with no vmap
batching rule (torch then loops over examples and warns "There is a performance drop ..."),
errors under `vmap`, and trainable parameters the forward never uses. `fix(module)` returns a
repaired copy and says what it changed; `check_supported` raises if anything is left.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from funcdp import nn as fnn

logger = logging.getLogger(__name__)

MIXES_EXAMPLES = "mixes_examples"
BUFFERS_CHANGE = "buffers_change"
NO_BATCHING_RULE = "no_batching_rule"
VMAP_ERROR = "vmap_error"
WEIGHT_CHANGED_IN_FORWARD = "weight_changed_in_forward"
SPARSE_GRADIENT = "sparse_gradient"
UNUSED_PARAMETER = "unused_parameter"

_FALLBACK = re.compile(
    r"performance drop because we have not yet implemented the batching rule for (\S+?)\.?\s"
)


class Finding(NamedTuple):
    """One problem in a module: where it is, what is wrong, and how to repair it.

    Attributes:
      submodule: the submodule's name as in `named_modules()` (the class name for the root).
      problem: what goes wrong, and why it matters for privacy or speed.
      fix: what to do about it.
      kind: one of the module constants (MIXES_EXAMPLES, NO_BATCHING_RULE, ...).
      fixable: whether `funcdp.fix` repairs it.
    """

    submodule: str
    problem: str
    fix: str
    kind: str = "other"
    fixable: bool = False


class Change(NamedTuple):
    """One replacement made by `fix`: where, what it was, what it is now, and its effect."""

    submodule: str
    before: str
    after: str
    changes_function: bool
    note: str


class UnsupportedModuleError(ValueError):
    """The module has submodules funcdp cannot train privately as they are; see `.findings`."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        lines = [
            f"- submodule '{f.submodule}': {f.problem}. Fix: {f.fix}"
            + (" (funcdp.fix(module) does this)" if f.fixable else "")
            for f in findings
        ]
        super().__init__("funcdp cannot train this module as it is:\n" + "\n".join(lines))


# Layers torch implements with kernels that vmap cannot batch, and funcdp's drop-in for each.
_NO_RULE = "which has no batching rule: vmap falls back to a slow loop over examples"
_DROP_INS: dict[type[nn.Module], tuple[type[nn.Module], str]] = {
    nn.LSTM: (fnn.LSTM, f"calls aten::mkldnn_rnn_layer, {_NO_RULE}"),
    nn.GRU: (fnn.GRU, "uses fused kernels that fail under vmap (shape mismatch in backward)"),
    nn.RNN: (fnn.RNN, "uses fused kernels that fail under vmap (shape mismatch in backward)"),
    nn.MultiheadAttention: (
        fnn.MultiheadAttention,
        f"with need_weights=False (as Transformer layers call it) takes the fused scaled-dot-product kernel on CPU, {_NO_RULE}",
    ),
    nn.TransformerEncoderLayer: (
        fnn.TransformerEncoderLayer,
        f"in eval mode without gradients takes the fused aten::_transformer_encoder_layer_fwd, {_NO_RULE}",
    ),
    nn.Bilinear: (fnn.Bilinear, f"calls aten::_trilinear, {_NO_RULE}"),
    nn.EmbeddingBag: (fnn.EmbeddingBag, f"calls aten::_embedding_bag, {_NO_RULE}"),
}


def validate(module: nn.Module, *, example_inputs: Any = None) -> list[Finding]:
    """Lists what in `module` breaks per-example privacy or vmap; an empty list means none found.

    Args:
      module: the model to check; it is never modified.
      example_inputs: optional batch (a tensor or a tuple of tensors, at least one row) to run a
        copy of the module on. Without it only the types of the submodules are checked; with it
        the run also finds buffers that change in training, ops without a batching rule, errors
        under `vmap`, and trainable parameters that get no gradient.

    Returns:
      One `Finding` per problem, each naming the submodule, the problem and the fix.
    """
    findings = []
    for name, sub in module.named_modules():
        findings.extend(_static_findings(_label(module, name), sub))
    if example_inputs is not None:
        # A run confirms what the types already told; keep the typed finding, which knows the fix.
        explained = {f.submodule for f in findings}
        seen = set(findings)
        for finding in _run_findings(module, _as_tuple(example_inputs)):
            if finding.kind != UNUSED_PARAMETER and finding.submodule in explained:
                continue
            if finding not in seen:
                seen.add(finding)
                findings.append(finding)
    return findings


def check_supported(module: nn.Module, *, example_inputs: Any = None) -> None:
    """Raises `UnsupportedModuleError` naming every problem `validate` finds.

    Raises:
      UnsupportedModuleError: a ValueError whose message names each submodule, its problem and
        what to do (and whether `funcdp.fix` repairs it); `.findings` holds the list.
    """
    findings = validate(module, example_inputs=example_inputs)
    if findings:
        raise UnsupportedModuleError(findings)


def fix(module: nn.Module, *, return_changes: bool = False) -> Any:
    """A repaired copy of `module`; the original is not modified.

    - every BatchNorm becomes a GroupNorm over the same channels, with `gcd(32, channels)`
      groups and the BatchNorm's affine weight and bias (this changes the function);
    - an InstanceNorm that tracks running statistics stops tracking them (same function in
      training; in eval mode it then normalizes with the instance's own statistics);
    - `nn.LSTM`, `nn.GRU`, `nn.RNN`, `nn.MultiheadAttention`, `nn.TransformerEncoderLayer`,
      `nn.Bilinear` and `nn.EmbeddingBag` become their `funcdp.nn` drop-ins with the same
      weights (same function);
    - an `Embedding` with `sparse=True` gets dense gradients (same function).

    Each change is logged (WARNING when it changes the function, INFO otherwise). What `fix`
    cannot repair (see `validate`) is left as it is.

    Args:
      module: the model to repair.
      return_changes: also return the list of `Change`s.

    Returns:
      The repaired copy, or `(copy, changes)` with `return_changes`.
    """
    repaired = copy.deepcopy(module)
    changes: list[Change] = []
    root = _replacement(repaired)
    if root is not None:
        repaired = root[0]
        changes.append(root[1]._replace(submodule=type(module).__name__))
    _fix_children(repaired, "", changes, {})
    for c in changes:
        level = logging.WARNING if c.changes_function else logging.INFO
        logger.log(level, "funcdp.fix: %s: %s -> %s (%s)", c.submodule, c.before, c.after, c.note)
    return (repaired, changes) if return_changes else repaired


def _fix_children(module: nn.Module, prefix: str, changes: list[Change], done: dict) -> None:
    """Replaces children depth-first, into replacements too; a shared child is replaced once.

    `done` maps id(original) -> (original, result); it holds the original so its id stays unique.
    """
    for name, child in list(module.named_children()):
        where = f"{prefix}.{name}" if prefix else name
        if id(child) in done:
            setattr(module, name, done[id(child)][1])
            continue
        found = _replacement(child)
        result = child if found is None else found[0]
        done[id(child)] = (child, result)
        if found is not None:
            setattr(module, name, result)
            changes.append(found[1]._replace(submodule=where))
        _fix_children(result, where, changes, done)


def _label(root: nn.Module, name: str) -> str:
    return name or type(root).__name__


def _static_findings(where: str, sub: nn.Module) -> list[Finding]:
    found = _static_problem(sub, type(sub).__name__)
    return [] if found is None else [Finding(where, *found)]


def _static_problem(sub: nn.Module, kind: str) -> tuple[str, str, str, bool] | None:
    """(problem, fix, kind, fixable) for a submodule known by its type, or None."""
    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
        problem = f"{kind} mixes the examples of a batch through its batch statistics, so per-example clipping does not bound one example's influence (and its running statistics change in training)"
        return problem, "replace it with GroupNorm", MIXES_EXAMPLES, True
    if isinstance(sub, nn.modules.instancenorm._InstanceNorm) and sub.track_running_stats:
        problem = f"{kind} with track_running_stats=True updates its running_mean/running_var buffers in training, which a functional step cannot carry and which leak data without noise"
        return problem, "set track_running_stats=False", BUFFERS_CHANGE, True
    if getattr(sub, "max_norm", None) is not None and isinstance(
        sub, (nn.Embedding, nn.EmbeddingBag)
    ):
        problem = f"{kind} with max_norm renormalizes its weight in place during the forward pass"
        return (
            problem,
            "set max_norm=None (bound the embedding norm another way)",
            WEIGHT_CHANGED_IN_FORWARD,
            False,
        )
    if type(sub) in _DROP_INS:
        drop_in, why = _DROP_INS[type(sub)]
        fix_text = f"replace it with funcdp.nn.{drop_in.__name__} (same state_dict)"
        return f"torch's {kind} {why}", fix_text, NO_BATCHING_RULE, True
    if isinstance(sub, nn.Embedding) and sub.sparse:
        problem = f"{kind} with sparse=True asks for sparse gradients, which per-example gradients do not support"
        return problem, "set sparse=False", SPARSE_GRADIENT, True
    if kind == "_SpectralNorm":
        problem = "spectral normalization updates its power-iteration vectors (buffers) in every training forward"
        return (
            problem,
            "remove the parametrization or use a fixed normalization",
            BUFFERS_CHANGE,
            False,
        )
    return None


def _replacement(child: nn.Module) -> tuple[nn.Module, Change] | None:
    kind = type(child).__name__
    if isinstance(child, nn.modules.batchnorm._BatchNorm):
        channels = child.num_features
        groups = math.gcd(32, channels)
        ref = next(iter([*child.parameters(), *child.buffers()]), torch.zeros(()))
        dtype = ref.dtype if ref.is_floating_point() else None
        norm = nn.GroupNorm(
            groups, channels, child.eps, child.affine, device=ref.device, dtype=dtype
        )
        if child.affine:
            norm.load_state_dict({"weight": child.weight.detach(), "bias": child.bias.detach()})
        note = f"group count {groups} = gcd(32, {channels}); per-example statistics instead of batch statistics"
        return norm.train(child.training), Change(
            "", kind, f"GroupNorm({groups}, {channels})", True, note
        )
    if isinstance(child, nn.modules.instancenorm._InstanceNorm) and child.track_running_stats:
        norm = copy.deepcopy(child)
        norm.track_running_stats = False
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            norm.register_buffer(name, None)
        note = "running statistics dropped; eval mode now uses each instance's statistics"
        return norm, Change("", kind, f"{kind}(track_running_stats=False)", True, note)
    if (
        type(child) in _DROP_INS
        and getattr(child, "max_norm", None) is None
        and not getattr(child, "sparse", False)
    ):
        drop_in = _DROP_INS[type(child)][0]
        return drop_in.from_torch(child), Change(
            "",
            kind,
            f"funcdp.nn.{drop_in.__name__}",
            False,
            "same weights and state_dict keys; vmap batches it",
        )
    if (
        isinstance(child, (nn.Embedding, nn.EmbeddingBag))
        and child.sparse
        and child.max_norm is None
    ):
        dense = copy.deepcopy(child)
        dense.sparse = False
        return dense, Change(
            "", kind, f"{kind}(sparse=False)", False, "dense gradients; same function"
        )
    return None


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _float_leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return _float_leaves(out.data)
    if isinstance(out, Mapping):
        return [leaf for v in out.values() for leaf in _float_leaves(v)]
    if isinstance(out, (tuple, list)):
        return [leaf for v in out for leaf in _float_leaves(v)]
    return []


def _total(out: Any) -> torch.Tensor:
    leaves = _float_leaves(out)
    if not leaves:
        raise ValueError("the module's output has no floating-point tensor to differentiate")
    return sum(leaf.sum() for leaf in leaves)


def _run_findings(module: nn.Module, inputs: tuple[Any, ...]) -> list[Finding]:
    findings = _buffer_findings(module, inputs)
    findings += _unused_findings(module, inputs)
    findings += _vmap_findings(module, inputs)
    return findings


def _buffer_findings(module: nn.Module, inputs: tuple[Any, ...]) -> list[Finding]:
    probe = copy.deepcopy(module).train()
    before = {name: b.detach().clone() for name, b in probe.named_buffers()}
    try:
        with torch.no_grad():
            probe(*inputs)
    except Exception:  # the vmap run reports errors with the submodule that raised them
        return []
    findings = []
    for name, b in probe.named_buffers():
        old = before.get(name)
        if old is not None and (old.shape != b.shape or not torch.equal(old, b)):
            owner, _, leaf = name.rpartition(".")
            layer = type(probe.get_submodule(owner)).__name__
            problem = f"buffer '{leaf}' changes during a training forward pass ({layer}): a functional step cannot carry the change, and a statistic of the data would be released without noise"
            fix_text = "make the buffer constant in training, or replace the layer"
            findings.append(Finding(_label(module, owner), problem, fix_text, BUFFERS_CHANGE))
    return findings


def _unused_findings(module: nn.Module, inputs: tuple[Any, ...]) -> list[Finding]:
    probe = copy.deepcopy(module)
    named = [(n, p) for n, p in probe.named_parameters() if p.requires_grad]
    if not named:
        return []
    try:
        grads = torch.autograd.grad(
            _total(probe(*inputs)), [p for _, p in named], allow_unused=True
        )
    except Exception:
        return []
    findings = []
    for (name, _), g in zip(named, grads, strict=True):
        if g is None:
            owner, _, leaf = name.rpartition(".")
            problem = f"parameter '{leaf}' requires grad but the forward pass never uses it: it gets no gradient, yet optimizers with weight decay would still change it"
            fix_text = "freeze it (requires_grad_(False)) or remove it"
            findings.append(Finding(_label(module, owner), problem, fix_text, UNUSED_PARAMETER))
    return findings


def _vmap_findings(module: nn.Module, inputs: tuple[Any, ...]) -> list[Finding]:
    probe = copy.deepcopy(module)
    tracker = _Tracker(probe)
    params = {n: p.detach() for n, p in probe.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in probe.named_buffers()}
    batched = [isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs]

    def loss(params, *example):
        rows = [x.unsqueeze(0) if b else x for x, b in zip(example, batched, strict=True)]
        return _total(functional_call(probe, (params, buffers), tuple(rows)))

    in_dims = (None, *(0 if b else None for b in batched))
    rows = tuple(x[:2] if b else x for x, b in zip(inputs, batched, strict=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.caught = caught
        try:
            vmap(grad(loss), in_dims=in_dims, randomness="different")(params, *rows)
        except Exception as error:  # noqa: BLE001 - reported with the submodule that raised it
            tracker.error(error)
        tracker.flush()
    tracker.remove()
    tracker.attribute_backward()
    return [
        _fallback_finding(probe, module, where, ops) for where, ops in tracker.fallbacks.items()
    ] + tracker.errors


def _fallback_finding(probe: nn.Module, module: nn.Module, where: str, ops: list[str]) -> Finding:
    sub = probe.get_submodule(where) if where else probe
    known = _DROP_INS.get(type(sub))
    fix_text = (
        f"replace it with funcdp.nn.{known[0].__name__}"
        if known
        else "rewrite it with ops vmap batches (for attention, call funcdp.nn.scaled_dot_product_attention; see funcdp.nn)"
    )
    problem = f"{type(sub).__name__} calls {', '.join(sorted(set(ops)))}, which has no vmap batching rule: per-example gradients fall back to a slow loop over examples"
    return Finding(_label(module, where), problem, fix_text, NO_BATCHING_RULE, known is not None)


class _Tracker:
    """Forward hooks that attribute warnings and errors to the innermost running submodule."""

    def __init__(self, root: nn.Module) -> None:
        self.root, self.stack, self.caught, self.seen = root, [], [], 0
        self.fallbacks: dict[str, list[str]] = {}
        self.errors: list[Finding] = []
        self.handles = []
        for name, sub in root.named_modules():
            self.handles.append(sub.register_forward_pre_hook(self._enter(name)))
            # No always_call: after an error the stack keeps the submodule that raised it.
            self.handles.append(sub.register_forward_hook(self._leave()))

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module, args):
            del module, args
            self.flush()
            self.stack.append(name)

        return hook

    def _leave(self) -> Callable[..., None]:
        def hook(module, args, output):
            del module, args, output
            self.flush()
            self.stack.pop()

        return hook

    def flush(self) -> None:
        where = self.stack[-1] if self.stack else ""
        for w in self.caught[self.seen :]:
            match = _FALLBACK.search(str(w.message))
            if match:
                self.fallbacks.setdefault(where, []).append(match.group(1))
        self.seen = len(self.caught)

    def attribute_backward(self) -> None:
        """Moves `op_backward` ops seen outside any submodule to where `op` ran forward."""
        leftover = []
        for op in self.fallbacks.pop("", []):
            forward = op.removesuffix("_backward")
            owners = [where for where, ops in self.fallbacks.items() if forward in ops]
            if owners:
                self.fallbacks[owners[0]].append(op)
            else:
                leftover.append(op)
        if leftover:
            self.fallbacks[""] = leftover

    def error(self, error: Exception) -> None:
        self.flush()
        where = self.stack[-1] if self.stack else ""
        sub = self.root.get_submodule(where) if where else self.root
        message = (
            str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        )
        problem = f"{type(sub).__name__} fails under vmap(grad): {type(error).__name__}: {message}"
        fix_text = "rewrite its forward with batchable ops (no data-dependent Python control flow, .item() or in-place updates of captured tensors), or use a funcdp.nn layer"
        where = _label(self.root, where)
        self.errors.append(Finding(where, problem, fix_text, VMAP_ERROR, type(sub) in _DROP_INS))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

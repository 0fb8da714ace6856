"""The findings only a run shows: changing buffers, unused parameters, vmap fallbacks and errors.

`funcdp.validate(module, example_inputs=...)` runs a copy of the module with these probes.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from funcdp._findings import (
    _DROP_INS,
    _FALLBACK,
    BUFFERS_CHANGE,
    NO_BATCHING_RULE,
    UNUSED_PARAMETER,
    VMAP_ERROR,
    Finding,
    _label,
)


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


def _run_findings(
    module: nn.Module, inputs: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None
) -> list[Finding]:
    kwargs = dict(kwargs or {})
    findings = _buffer_findings(module, inputs, kwargs)
    findings += _unused_findings(module, inputs, kwargs)
    findings += _vmap_findings(module, inputs, kwargs)
    return findings


def _buffer_findings(module: nn.Module, inputs: tuple[Any, ...], kwargs) -> list[Finding]:
    probe = copy.deepcopy(module).train()
    before = {name: b.detach().clone() for name, b in probe.named_buffers()}
    try:
        with torch.no_grad():
            probe(*inputs, **kwargs)
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


def _unused_findings(module: nn.Module, inputs: tuple[Any, ...], kwargs) -> list[Finding]:
    probe = copy.deepcopy(module)
    named = [(n, p) for n, p in probe.named_parameters() if p.requires_grad]
    if not named:
        return []
    try:
        grads = torch.autograd.grad(
            _total(probe(*inputs, **kwargs)), [p for _, p in named], allow_unused=True
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


def _vmap_findings(module: nn.Module, inputs: tuple[Any, ...], kwargs) -> list[Finding]:
    probe = copy.deepcopy(module)
    tracker = _Tracker(probe)
    params = {n: p.detach() for n, p in probe.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in probe.named_buffers()}
    names = tuple(kwargs)
    values = (*inputs, *kwargs.values())  # keyword inputs are mapped over as the positional
    batched = [isinstance(x, torch.Tensor) and x.dim() > 0 for x in values]

    def loss(params, *example):
        rows = [x.unsqueeze(0) if b else x for x, b in zip(example, batched, strict=True)]
        positional, keyword = (
            rows[: len(inputs)],
            dict(zip(names, rows[len(inputs) :], strict=True)),
        )
        return _total(functional_call(probe, (params, buffers), tuple(positional), keyword))

    in_dims = (None, *(0 if b else None for b in batched))
    rows = tuple(x[:2] if b else x for x, b in zip(values, batched, strict=True))
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


def _message(error: Exception) -> str:
    """The error's first paragraph, whole (never cut mid-word), on one line."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return " ".join(text.split("\n\n")[0].split())


def _failing_frames(error: Exception) -> tuple[str | None, str | None]:
    """("path:line in function" of the innermost frame outside torch, and of the innermost
    frame outside torch, transformers and peft: the user's code), None where there is none."""
    frames = traceback.extract_tb(error.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    outside = [f for f in frames if not f.filename.startswith((torch_dir, here))]
    libraries = (f"{os.sep}transformers{os.sep}", f"{os.sep}peft{os.sep}")
    own = [f for f in outside if not any(lib in f.filename for lib in libraries)]
    text = lambda f: f"{f.filename}:{f.lineno} in {f.name}"  # noqa: E731
    frame = text(outside[-1]) if outside else None
    caller = text(own[-1]) if own and own[-1] is not outside[-1] else None
    return frame, caller


def note_loss_error(error: Exception) -> None:
    """Adds to an error that a step's loss raised where it came from and, for known causes
    (HF attention masks, `.item()`, data-dependent control flow), what to do. Errors raised by
    funcdp itself, with no frame of the user's or a library's code, are left as they are; so
    is every error on Python 3.10, whose exceptions take no notes."""
    frame, caller = _failing_frames(error)
    if frame is None or not hasattr(error, "add_note"):
        return
    module = _innermost_module(error)
    inside = f" inside {module}" if module else ""
    called = f" (called from {caller})" if caller else ""
    fix, _ = _error_fix(_message(error), frame)
    error.add_note(f"funcdp: the loss raised this under vmap{inside} at {frame}{called}; {fix}")


def _innermost_module(error: Exception) -> str | None:
    """The class of the innermost `nn.Module` whose method was running when `error` was raised
    (a functional loss runs the module's own forward, so its frames name it)."""
    found, tb = None, error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            found = f"{type(owner).__module__}.{type(owner).__qualname__}"
        tb = tb.tb_next
    return found


def _error_fix(message: str, frame: str | None) -> tuple[str, bool]:
    """What to do about an error under vmap, for the known causes; and whether fix() does it."""
    if "transformers" in sys.modules and frame is not None:
        from funcdp.hf.checks import (
            ATTENTION_FIX,
            MASK_CAUSE,
            NO_MASK_FIX,
            is_mask_error,
            is_no_mask_error,
        )

        if is_mask_error(frame):
            return f"{MASK_CAUSE}: {ATTENTION_FIX}", True
        if is_no_mask_error(frame):
            return NO_MASK_FIX, False
    if "data-dependent control flow" in message or ".item()" in message:
        where = f" at {frame}" if frame else ""
        return (
            f"the forward reads a tensor's value in Python{where} (.item(), `if tensor:`, "
            "int(tensor)), which vmap cannot do per example: use no data-dependent Python "
            "control flow; compute with tensor ops (torch.where, masks) or move the value out "
            "of the per-example path"
        ), False
    return (
        "rewrite its forward with batchable ops (no data-dependent Python control flow, .item() "
        "or in-place updates of captured tensors), or use a funcdp.nn layer"
    ), False


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
        frame, caller = _failing_frames(error)
        problem = f"{type(sub).__name__} fails under vmap(grad): {type(error).__name__}: {_message(error)}"
        if frame:
            problem += f" [raised at {frame}" + (f"; called from {caller}]" if caller else "]")
        fix_text, fixable = _error_fix(str(error), frame or caller)
        where = _label(self.root, where)
        fixable = fixable or type(sub) in _DROP_INS
        self.errors.append(Finding(where, problem, fix_text, VMAP_ERROR, fixable))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

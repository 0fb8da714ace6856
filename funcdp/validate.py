"""Find what in a module breaks differential privacy or vmap, and repair what can be repaired.

`validate(module)` inspects the submodules by type; given `example_inputs` it also runs the module
(on a copy) and reports what only a run shows: buffers that change in training, ops with no vmap
batching rule (torch then loops over examples and warns "There is a performance drop ..."),
errors under `vmap`, and trainable parameters the forward never uses. `fix(module)` returns a
repaired copy and says what it changed; `check_supported` raises if anything is left.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from funcdp._findings import (
    _DROP_INS,
    BUFFERS_CHANGE,
    MIXES_EXAMPLES,
    NO_BATCHING_RULE,
    SPARSE_GRADIENT,
    UNUSED_PARAMETER,
    WEIGHT_CHANGED_IN_FORWARD,
    Change,
    Finding,
    UnsupportedModuleError,
    _label,
)
from funcdp._probes import _as_tuple, _run_findings

logger = logging.getLogger(__name__)


def validate(
    module: nn.Module,
    *,
    example_inputs: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
) -> list[Finding]:
    """Lists what in `module` breaks per-example privacy or vmap; an empty list means none found.

    Without example inputs only what the types show is checked (submodule types, and a Hugging
    Face model's attention implementation); a model can still fail in its forward, so an empty
    list then proves little: pass inputs.

    A Hugging Face model is run as `funcdp.hf`'s losses run it: its "sdpa" (default) or "eager"
    attention switched to the same function in a form vmap batches (`funcdp.hf.vmap_attention`),
    so an empty list says the model trains through `funcdp.hf.causal_lm` or
    `sequence_classification`. A loss of your own that calls the model as it is must call it
    inside `funcdp.hf.vmap_attention(model)` too (or train `funcdp.fix(model)`): without inputs,
    `validate` names HF's default attention, which fails under vmap when called as it is.

    Args:
      module: the model to check; it is never modified.
      example_inputs: optional batch (a tensor or a tuple of tensors, at least one row) to run a
        copy of the module on, positionally.
      example_kwargs: optional keyword inputs of that run, e.g. `{"input_ids": ids,
        "attention_mask": mask}` for a Hugging Face model (whose second positional argument is
        not the mask). Tensors with a leading dimension are rows, as in `example_inputs`. The run
        finds buffers that change in training, ops without a batching rule, errors under `vmap`
        (with the file and line that raised, and what to do for known causes), and trainable
        parameters that get no gradient.

    Returns:
      One `Finding` per problem, each naming the submodule, the problem and the fix.
    """
    findings = []
    for name, sub in module.named_modules():
        findings.extend(_static_findings(_label(module, name), sub))
    ran = example_inputs is not None or bool(example_kwargs)
    hf = _hf_checks()
    if hf is not None:
        findings.extend(hf.attention_findings(_label(module, ""), module, ran=ran))
    if ran:
        inputs = () if example_inputs is None else _as_tuple(example_inputs)
        # HF models run as funcdp.hf runs them: attention under vmap_attention (same function).
        context = contextlib.nullcontext() if hf is None else hf.vmap_attention(module)
        with context:
            run = _run_findings(module, inputs, example_kwargs)
        # A run confirms what the types already told; keep the typed finding, which knows the fix.
        explained = {f.submodule for f in findings}
        seen = set(findings)
        for finding in run:
            if finding.kind != UNUSED_PARAMETER and finding.submodule in explained:
                continue
            if hf is not None and _explained_by_hf(finding, findings, hf):
                continue
            if finding not in seen:
                seen.add(finding)
                findings.append(finding)
    return findings


def _hf_checks():
    """`funcdp.hf.checks` when transformers is loaded (a model of it may be here), else None."""
    if "transformers" not in sys.modules:
        return None
    from funcdp.hf import checks

    return checks


def _explained_by_hf(finding: Finding, findings: list[Finding], hf) -> bool:
    """A run's mask error or sdpa loop that the HF attention finding already reports."""
    if not any(f.kind == hf.HF_ATTENTION for f in findings):
        return False
    return "masking_utils" in finding.problem or "scaled_dot_product" in finding.problem


def check_supported(
    module: nn.Module,
    *,
    example_inputs: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Raises `UnsupportedModuleError` naming every problem `validate` finds.

    Raises:
      UnsupportedModuleError: a ValueError whose message names each submodule, its problem and
        what to do (and whether `funcdp.fix` repairs it); `.findings` holds the list.
    """
    findings = validate(module, example_inputs=example_inputs, example_kwargs=example_kwargs)
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
    - an `Embedding` with `sparse=True` gets dense gradients (same function);
    - a Hugging Face model's "sdpa" (default) or "eager" attention becomes funcdp's vmap
      version of it (`funcdp.hf.attention`; same function; not saved by `save_pretrained`).

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
    hf = _hf_checks()
    if hf is not None:
        hf.fix_attention(repaired, changes)
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

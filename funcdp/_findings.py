"""What `funcdp.validate` reports and `funcdp.fix` changes: plain records and their kinds."""

from __future__ import annotations

import re
from typing import NamedTuple

from torch import nn

from funcdp import nn as fnn

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


def _label(root: nn.Module, name: str) -> str:
    return name or type(root).__name__

"""What `funcdp.validate` and `funcdp.fix` know about Hugging Face attention.

Loaded by `funcdp.validate` only when `transformers` is already imported (a model of it exists),
so `import funcdp` never imports transformers.
"""

from __future__ import annotations

from torch import nn

from funcdp._findings import Change, Finding
from funcdp.hf.attention import SWITCH, model_configs
from funcdp.hf.attention import vmap_attention as vmap_attention  # validate runs models in it

HF_ATTENTION = "hf_attention"

ATTENTION_FIX = (
    "train through funcdp.hf.causal_lm(model) or funcdp.hf.sequence_classification(model), "
    "which run HF's attention as funcdp_sdpa/funcdp_eager (the same function, mask always "
    "built, torch's kernel as matmuls) while the loss runs; in a loss of your own, call the "
    "model inside funcdp.hf.vmap_attention(model); or use funcdp.fix(model), which switches "
    "the copy's config"
)
MASK_CAUSE = (
    "transformers builds the attention mask with a Python branch on the 2-D attention_mask's "
    "values (masking_utils: skip the mask when no token is padded), which vmap cannot take"
)

NO_MASK_FIX = (
    "pass the attention_mask (1 on real tokens) with the input_ids, as funcdp.hf's tasks do: "
    "without one, transformers looks for padding tokens in input_ids with a Python branch "
    "(warn_if_padding_and_no_attention_mask), which vmap cannot take"
)


def attention_findings(root_label: str, module: nn.Module, *, ran: bool) -> list[Finding]:
    """One finding per attention implementation of `module` that fails or loops under vmap.

    "sdpa" (HF's default) fails only when the model is called as it is (so does "eager" in
    bidirectional models such as BERT, which only a run shows); funcdp.hf runs both under
    `vmap_attention`, and so does `validate`'s run (`ran`): with a run, the run is the check,
    and only the implementations funcdp cannot switch are reported.
    """
    names = sorted({c._attn_implementation for c in model_configs(module)} - {None})
    findings = []
    for name in names:
        if name == "sdpa" and not ran:
            problem = (
                "HF attention 'sdpa' (the default), called as it is (e.g. through "
                f"funcdp.functionalize in a loss of your own), fails under vmap: {MASK_CAUSE}, "
                "and on CPU torch's fused scaled-dot-product kernel has no batching rule (a slow "
                "loop over examples); funcdp.hf runs it as the same function that vmap batches "
                "(pass example inputs to validate to run the model that way)"
            )
            findings.append(Finding(root_label, problem, ATTENTION_FIX, HF_ATTENTION, True))
        elif name not in SWITCH and name not in SWITCH.values():
            problem = f"HF attention {name!r} has no vmap support (fused kernels)"
            fix = 'load the model with attn_implementation="sdpa" (the default) or "eager"'
            findings.append(Finding(root_label, problem, fix, HF_ATTENTION, False))
    return findings


def is_mask_error(frame: str | None) -> bool:
    """Whether an error raised at `frame` ("path:line in function") is HF's mask branch."""
    return frame is not None and "masking_utils" in frame and "transformers" in frame


def is_no_mask_error(frame: str | None) -> bool:
    """Whether an error raised at `frame` is HF's look for padding when no mask was passed."""
    return frame is not None and frame.endswith(" in warn_if_padding_and_no_attention_mask")


def fix_attention(module: nn.Module, changes: list[Change]) -> None:
    """Switches every "sdpa" or "eager" config of `module` (a copy) to its vmap version.

    The implementation name is not saved by `save_pretrained` (HF leaves it out of the
    config file), so a saved model loads with HF's default again.
    """
    for config in model_configs(module):
        current = config._attn_implementation
        if current in SWITCH:
            config._attn_implementation_internal = SWITCH[current]
            note = "same function: the mask is always built and torch's kernel runs as matmuls"
            changes.append(
                Change(
                    type(config).__name__, f"attention {current!r}", SWITCH[current], False, note
                )
            )

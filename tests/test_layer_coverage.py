"""Coverage matrix: per-example gradients of common layers equal a per-example loop.

Each case builds a torch module and a batch from drawn sizes. The module goes through
`funcdp.fix`, then `funcdp.functionalize` and `funcdp.per_sample_grads` with vmap's per-example
fallback warning turned into an error; the reference is a plain autograd loop over the examples
of the ORIGINAL torch module. So a pass shows both that the fixed module computes the same
per-example gradients as torch's layer and that vmap batches it without falling back.

`python tests/test_layer_coverage.py --table` prints the README's table of supported layers.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcdp as fdp
import funcdp.nn as fnn

FALLBACK = r".*performance drop because we have not yet implemented the batching rule.*"


class Sizes:
    """Draws sizes from hypothesis in tests; gives the smallest choices when building the table."""

    def __init__(self, data: Any = None) -> None:
        self.data = data

    def int(self, low: int, high: int) -> int:
        return low if self.data is None else self.data.draw(st.integers(low, high))

    def bool(self) -> bool:
        return False if self.data is None else self.data.draw(st.booleans())

    def choice(self, options: list[Any]) -> Any:
        return options[0] if self.data is None else self.data.draw(st.sampled_from(options))


class Case(NamedTuple):
    """A layer: `build(sizes, batch) -> (module, inputs)`, tolerance, and a note for the table."""

    name: str
    build: Callable[[Sizes, int], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    tol: float = 1e-5
    note: str = ""


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _conv(dims: int, transpose: bool) -> Callable:
    def build(s: Sizes, b: int):
        cin, cout, k = s.int(1, 3), s.int(1, 4), s.int(1, 3)
        stride, groups = s.int(1, 2), s.choice([1, cin]) if cin == cout else 1
        cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d][
            dims - 1 + (3 if transpose else 0)
        ]
        size = s.int(k + 1, 6 if dims < 3 else 4)
        return cls(cin, cout, k, stride=stride, groups=groups), (_x(b, cin, *[size] * dims),)

    return build


class Tied(nn.Module):
    """A tiny language model whose output layer shares the embedding's weight."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


class Frozen(nn.Module):
    """A frozen feature layer under a trainable head."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.features = nn.Linear(dim, dim).requires_grad_(False)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)))


class Custom(nn.Module):
    """Raw `nn.Parameter`s used directly in forward (a gated scale and a bias matrix)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))
        self.mix = nn.Parameter(torch.randn(dim, dim) / dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x * self.scale) @ self.mix + x.pow(2) * self.scale


def _recurrent(cls: type[nn.RNNBase]) -> Callable:
    def build(s: Sizes, b: int):
        # batch_first so that examples are rows; seq-first layouts are pinned in test_nn_rnn.py.
        module = cls(s.int(1, 4), s.int(1, 5), num_layers=s.int(1, 2), bidirectional=s.bool(),
                     batch_first=True)  # fmt: skip
        return module, (_x(b, s.int(1, 5), module.input_size),)

    return build


def _attention(s: Sizes, b: int):
    heads = s.int(1, 2)
    dim, kdim = heads * s.int(1, 3), s.choice([None, 3])
    module = nn.MultiheadAttention(dim, heads, kdim=kdim, vdim=kdim, batch_first=True)
    source = s.int(1, 4)
    key = _x(b, source, kdim or dim)
    return module, (_x(b, s.int(1, 4), dim), key, key.clone())


def _encoder(s: Sizes, b: int):
    heads = s.int(1, 2)
    dim = 2 * heads
    module = nn.TransformerEncoderLayer(dim, heads, 8, dropout=0.0, batch_first=True,
                                        norm_first=s.bool())  # fmt: skip
    return module, (_x(b, s.int(1, 4), dim),)


def _decoder(s: Sizes, b: int):
    heads = s.int(1, 2)
    dim = 2 * heads
    module = nn.TransformerDecoderLayer(dim, heads, 8, dropout=0.0, batch_first=True)
    return module, (_x(b, s.int(1, 4), dim), _x(b, s.int(1, 4), dim))


def _embedding_bag(s: Sizes, b: int):
    module = nn.EmbeddingBag(7, s.int(1, 4), mode=s.choice(["mean", "sum", "max"]),
                             padding_idx=s.choice([None, 0]))  # fmt: skip
    return module, (torch.randint(0, 7, (b, s.int(1, 5))),)


CASES = [
    Case("Linear", lambda s, b: (nn.Linear(s.int(1, 4), s.int(1, 4)), None)),
    Case("Bilinear", lambda s, b: (nn.Bilinear(2, 3, s.int(1, 4)), (_x(b, 2), _x(b, 3)))),
    Case("Conv1d", _conv(1, False), 1e-4),
    Case("Conv2d", _conv(2, False), 1e-4),
    Case("Conv3d", _conv(3, False), 1e-4),
    Case("ConvTranspose1d", _conv(1, True), 1e-4),
    Case("ConvTranspose2d", _conv(2, True), 1e-4),
    Case("LayerNorm", lambda s, b: (nn.LayerNorm(s.int(2, 5)), None)),
    Case("GroupNorm", lambda s, b: (nn.GroupNorm(2, 4), (_x(b, 4, s.int(1, 4)),))),
    Case(
        "InstanceNorm1d",
        lambda s, b: (nn.InstanceNorm1d(3, affine=True), (_x(b, 3, s.int(2, 5)),)),
        note="affine, no running stats (fix drops them)",
    ),  # fmt: skip
    Case(
        "InstanceNorm2d",
        lambda s, b: (nn.InstanceNorm2d(2, affine=True), (_x(b, 2, 3, s.int(2, 4)),)),
    ),
    Case("RMSNorm", lambda s, b: (nn.RMSNorm(s.int(1, 5)), None)),
    Case(
        "Embedding",
        lambda s, b: (
            nn.Embedding(9, s.int(1, 4), padding_idx=s.choice([None, 0])),
            (torch.randint(0, 9, (b, s.int(1, 5))),),
        ),
    ),  # fmt: skip
    Case("EmbeddingBag", _embedding_bag, note="2-D input or input + offsets; sum, mean, max"),
    Case("PReLU", lambda s, b: (nn.PReLU(s.choice([1, 3])), (_x(b, 3, s.int(1, 4)),))),
    Case("MultiheadAttention", _attention),
    Case("TransformerEncoderLayer", _encoder, note="dropout 0 here (vmap draws it per example)"),
    Case("TransformerDecoderLayer", _decoder),
    Case(
        "LSTM",
        _recurrent(nn.LSTM),
        note="multi-layer, bidirectional, batch_first, packed sequences or lengths (test_nn_rnn.py)",
    ),
    Case("GRU", _recurrent(nn.GRU)),
    Case("RNN", _recurrent(nn.RNN)),
    Case(
        "tied weights",
        lambda s, b: (Tied(s.int(2, 6), s.int(1, 4)), (torch.randint(0, 2, (b, 3)),)),
    ),
    Case("frozen parameters", lambda s, b: (Frozen(s.int(1, 4)), None)),
    Case("custom nn.Parameter", lambda s, b: (Custom(s.int(1, 4)), None)),
]


def build(case: Case, sizes: Sizes, batch: int):
    """The case's module and inputs; cases whose inputs are None take one [B, 2, in] tensor."""
    module, inputs = case.build(sizes, batch)
    if inputs is None:
        width = next(p for p in module.parameters()).shape[-1]
        inputs = (_x(batch, 2, width),)
    return module, inputs


def _loss_of(out: Any) -> torch.Tensor:
    leaves = out if isinstance(out, tuple) else (out,)
    leaves = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    # A fixed, non-symmetric function of every output so that no gradient vanishes by symmetry.
    return sum((leaf.pow(2) + torch.sin(3 * leaf)).sum() for leaf in leaves)


def loop_grads(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Per-example gradients of the trainable parameters, one autograd call per example."""
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    rows = []
    for i in range(inputs[0].shape[0]):
        example = tuple(x[i : i + 1] for x in inputs)
        grads = torch.autograd.grad(_loss_of(module(*example)), list(named.values()))
        rows.append(grads)
    return {name: torch.stack([r[j] for r in rows]) for j, name in enumerate(named)}


def vmap_grads(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Per-example gradients by funcdp; vmap's per-example fallback warning is an error."""
    apply_fn, params, buffers = fdp.functionalize(module)

    def loss_fn(params, *example):
        return _loss_of(apply_fn(params, buffers, *(x[None] for x in example)))

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=FALLBACK, category=UserWarning)
        return fdp.per_sample_grads(loss_fn)(params, *inputs)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@settings(max_examples=6, derandomize=True, deadline=None)
@given(data=st.data())
def test_per_example_grads_match_a_loop_without_fallback(case: Case, data) -> None:
    torch.manual_seed(0)
    batch = data.draw(st.integers(1, 3))
    module, inputs = build(case, Sizes(data), batch)
    fixed = fdp.fix(module)
    got = vmap_grads(fixed, inputs)
    want = loop_grads(module, inputs)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=case.tol, atol=case.tol, msg=name)
    # Evaluation runs under vmap without gradients, in eval mode (torch's fused fast paths).
    got_out = vmap_eval(fixed.eval(), inputs)
    with torch.no_grad():
        want_out = tuple(module.eval()(*(x[i : i + 1] for x in inputs)) for i in range(batch))
    torch.testing.assert_close(got_out, want_out, rtol=case.tol, atol=case.tol)


def vmap_eval(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    """Outputs of each example under vmap and no_grad; the fallback warning is an error."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("error", message=FALLBACK, category=UserWarning)
        out = torch.func.vmap(lambda *example: module(*(x[None] for x in example)))(*inputs)
    return tuple(fdp.tree.tree_map(lambda t, i=i: t[i], out) for i in range(inputs[0].shape[0]))


def test_every_case_names_a_distinct_layer() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", ["Bilinear", "EmbeddingBag", "LSTM", "TransformerEncoderLayer"])
def test_unfixed_torch_layers_trip_the_fallback_check(name: str) -> None:
    """The fallback check can fail: torch's own versions of these layers trigger it."""
    case = next(c for c in CASES if c.name == name)
    module, inputs = build(case, Sizes(), 2)
    with pytest.raises(UserWarning, match="batching rule"):
        vmap_grads(module, inputs)


def test_gru_and_rnn_from_torch_fail_under_vmap_but_funcdps_work() -> None:
    for cls in (nn.GRU, nn.RNN):
        module, inputs = _recurrent(cls)(Sizes(), 2)
        with pytest.raises(RuntimeError):
            vmap_grads(module, inputs)
        torch.testing.assert_close(vmap_grads(fdp.fix(module), inputs), loop_grads(module, inputs))


def test_fix_reports_a_drop_in_for_every_layer_that_needs_one() -> None:
    expected = {"Bilinear", "EmbeddingBag", "MultiheadAttention", "TransformerEncoderLayer",
                "TransformerDecoderLayer", "LSTM", "GRU", "RNN"}  # fmt: skip
    replaced = {case.name for case in CASES if _path(case) != "as is"}
    assert replaced == expected


def _path(case: Case) -> str:
    module, _ = build(case, Sizes(), 1)
    _, changes = fdp.fix(module, return_changes=True)
    afters = sorted({c.after for c in changes})
    return ", ".join(f"`{a}` (via `fix`)" for a in afters) if afters else "as is"


def supported_layers_table() -> str:
    """The README's markdown table of supported layers, one row per case of `CASES`."""
    rows = ["| layer | runs as | per-example gradient tolerance (float32) | notes |",
            "| --- | --- | --- | --- |"]  # fmt: skip
    for case in CASES:
        rows.append(f"| {case.name} | {_path(case)} | {case.tol:g} | {case.note} |")
    return "\n".join(rows)


# ------------------------------------------------- funcdp.nn attention and layers against torch


@settings(max_examples=15, derandomize=True, deadline=None)
@given(
    length=st.integers(1, 4),
    source=st.integers(1, 4),
    mask=st.sampled_from(["none", "bool", "float", "causal"]),
    scale=st.sampled_from([None, 0.3]),
)
def test_sdpa_matches_torch(length: int, source: int, mask: str, scale: float | None) -> None:
    torch.manual_seed(0)
    q, k, v = _x(2, 3, length, 4), _x(2, 3, source, 4), _x(2, 3, source, 5)
    kwargs: dict[str, Any] = {"scale": scale, "is_causal": mask == "causal"}
    if mask == "bool":
        allowed = torch.rand(length, source) > 0.3
        allowed[:, 0] = True  # every query attends somewhere
        kwargs["attn_mask"] = allowed
    elif mask == "float":
        kwargs["attn_mask"] = _x(length, source)
    got = fnn.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(
        got, F.scaled_dot_product_attention(q, k, v, **kwargs), rtol=1e-5, atol=1e-5
    )


def test_sdpa_refuses_bad_arguments() -> None:
    q = _x(1, 2, 3)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        fnn.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        fnn.scaled_dot_product_attention(
            q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True
        )


@settings(max_examples=40, derandomize=True, deadline=None)
@given(
    batch_first=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    extras=st.sampled_from(["plain", "kdim", "bias_kv", "zero_attn", "self"]),
    masks=st.sampled_from(["none", "padding", "bool_attn", "attn", "causal", "unbatched"]),
)
def test_multihead_attention_matches_torch(
    batch_first, need_weights, average, extras, masks
) -> None:
    """`extras="self"` passes one tensor as query, key and value (funcdp's own projection path)."""
    torch.manual_seed(0)
    kdim = 3 if extras == "kdim" else None
    reference = nn.MultiheadAttention(4, 2, kdim=kdim, vdim=kdim, batch_first=batch_first,
                                      add_bias_kv=extras == "bias_kv",
                                      add_zero_attn=extras == "zero_attn").eval()  # fmt: skip
    ours = fnn.MultiheadAttention.from_torch(reference)
    assert type(ours) is fnn.MultiheadAttention and list(ours.state_dict()) == list(
        reference.state_dict()
    )
    batch, length = 2, 3
    shape = (lambda n, e: (batch, n, e)) if batch_first else (lambda n, e: (n, batch, e))
    q, kv = _x(*shape(length, 4)), _x(*shape(length, kdim or 4))
    kwargs: dict[str, Any] = {"need_weights": need_weights, "average_attn_weights": average}
    if masks == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False, False, True], [False, True, True]])
    elif masks == "attn":
        kwargs["attn_mask"] = _x(length, length)
    elif masks == "bool_attn":
        kwargs["attn_mask"] = torch.tensor(
            [[False, True, False], [False] * 3, [True, False, False]]
        )
    elif masks == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
        kwargs["is_causal"] = True
    elif masks == "unbatched":
        q, kv = q[0] if batch_first else q[:, 0], kv[0] if batch_first else kv[:, 0]
    if extras == "self":
        kv = q
    want = reference(q, kv, kv, **kwargs)
    got = ours(q, kv, kv, **kwargs)
    if masks == "causal" and extras in ("bias_kv", "zero_attn") and not need_weights:
        # torch disagrees with itself here: without weights it reads is_causal as a causal
        # mask over the appended key column too; funcdp keeps the attn_mask, as torch does
        # when it returns weights.
        want = (reference(q, kv, kv, **{**kwargs, "need_weights": True})[0], None)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert (got[1] is None) == (want[1] is None) == (not need_weights)
    if need_weights:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_multihead_attention_builds_the_causal_mask_it_is_told_of() -> None:
    torch.manual_seed(0)
    ours = fnn.MultiheadAttention(4, 2, batch_first=True)
    x = _x(2, 3, 4)
    mask = nn.Transformer.generate_square_subsequent_mask(3)
    want, _ = ours(x, x, x, attn_mask=mask)
    got, _ = ours(x, x, x, is_causal=True)
    torch.testing.assert_close(got, want)


def test_bilinear_matches_torch_with_extra_batch_dims() -> None:
    torch.manual_seed(0)
    reference = nn.Bilinear(3, 2, 4)
    ours = fnn.Bilinear.from_torch(reference)
    x1, x2 = _x(2, 5, 3), _x(2, 5, 2)
    torch.testing.assert_close(ours(x1, x2), reference(x1, x2), rtol=1e-5, atol=1e-5)


@settings(max_examples=20, derandomize=True, deadline=None)
@given(
    mode=st.sampled_from(["sum", "mean", "max"]),
    padding_idx=st.sampled_from([None, 0]),
    include_last=st.booleans(),
    weighted=st.booleans(),
    data=st.data(),
)
def test_embedding_bag_with_offsets_matches_torch(
    mode, padding_idx, include_last, weighted, data
) -> None:
    torch.manual_seed(0)
    reference = nn.EmbeddingBag(
        6, 3, mode=mode, padding_idx=padding_idx, include_last_offset=include_last
    )
    ours = fnn.EmbeddingBag.from_torch(reference)
    count = data.draw(st.integers(1, 8))
    tokens = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=count, max_size=count)))
    cuts = sorted(data.draw(st.lists(st.integers(0, count), min_size=1, max_size=4)))
    offsets = torch.tensor([0, *cuts[1:]] if not include_last else [0, *cuts[1:], count])
    weights = torch.rand(count) if weighted and mode == "sum" else None
    want = reference(tokens, offsets, per_sample_weights=weights)
    got = ours(tokens, offsets, per_sample_weights=weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if weights is None:  # the 2-D form agrees with the 1-D form on equal-length bags
        rows = tokens[: count - count % 2].view(-1, 2) if count > 1 else tokens.view(1, 1)
        torch.testing.assert_close(ours(rows), reference(rows), rtol=1e-5, atol=1e-6)


def test_embedding_bag_refuses_what_a_functional_forward_cannot_do() -> None:
    with pytest.raises(
        ValueError, match="max_norm must be None for funcdp.nn.EmbeddingBag, got 1.0"
    ):
        fnn.EmbeddingBag(4, 2, max_norm=1.0)
    with pytest.raises(ValueError, match="sparse must be False"):
        fnn.EmbeddingBag(4, 2, sparse=True)
    bag = fnn.EmbeddingBag(4, 2, mode="max")
    with pytest.raises(ValueError, match="per_sample_weights needs mode \"sum\", got mode 'max'"):
        bag(torch.tensor([[1, 2]]), per_sample_weights=torch.ones(1, 2))
    with pytest.raises(ValueError, match="offsets must be None when input is 2-D"):
        bag(torch.tensor([[1, 2]]), torch.tensor([0]))


if __name__ == "__main__":
    if "--table" in sys.argv:
        print(supported_layers_table())
    else:
        sys.exit(pytest.main([__file__, "-q"]))

"""Hypothesis strategies for privacy transforms: parameter trees, per-example gradients, batches.

Values are drawn from a `torch.Generator` seeded by hypothesis, while the structure (shapes,
dtypes, which rows are huge, tiny, zero or not finite, which are padding) is drawn by hypothesis
itself, so examples stay cheap and failures shrink to small, readable cases.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
ROW_KINDS = ("normal", "huge", "tiny", "zero", "nonfinite")
FINITE_ROW_KINDS = ("normal", "huge", "tiny", "zero")
RELATIONS = ("add_remove", "replace")


class Neighbours(NamedTuple):
    """Two batches that differ in one example.

    Attributes:
      grads, mask: the first batch, a per-example tree [B, ...] and its bool mask [B].
      other_grads, other_mask: the neighbour.
      relation: "add_remove" (the neighbour lacks one real example: deleted, or masked out as
        padding) or "replace" (one real example has other values).
      index: the row of the first batch that differs.
    """

    grads: Any
    mask: torch.Tensor
    other_grads: Any
    other_mask: torch.Tensor
    relation: str
    index: int


@st.composite
def param_trees(
    draw,
    *,
    max_leaves: int = 3,
    max_dim: int = 4,
    max_rank: int = 3,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
) -> dict[str, Any]:
    """Parameter trees: dicts (sometimes nested) of tensors of mixed shapes and dtypes."""
    count = draw(st.integers(1, max_leaves))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    tree: dict[str, Any] = {}
    for i in range(count):
        shape = tuple(draw(st.lists(st.integers(1, max_dim), max_size=max_rank)))
        dtype = draw(st.sampled_from(dtypes))
        leaf = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if draw(st.booleans()) and i > 0:
            tree.setdefault("block", {})[f"p{i}"] = leaf
        else:
            tree[f"p{i}"] = leaf
    return tree


@st.composite
def masks(draw, batch_size: int, *, min_real: int = 0) -> torch.Tensor:
    """Bool masks of shape [batch_size] with at least `min_real` true rows."""
    bits = draw(st.lists(st.booleans(), min_size=batch_size, max_size=batch_size))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(batch_size)
    missing = max(0, min_real - int(mask.sum()))
    if missing:
        mask[torch.nonzero(~mask).flatten()[:missing]] = True
    return mask


@st.composite
def per_example_trees(
    draw,
    params: Any,
    batch_size: int,
    *,
    kinds: tuple[str, ...] = ROW_KINDS,
) -> Any:
    """Per-example gradient trees shaped like `params` with a leading [batch_size] dimension.

    Each row is drawn as one of `kinds`: "normal" (a random direction with a norm anywhere from
    1e-3 to 1e3), "huge" (entries up to 1e30, so squares may overflow in float32), "tiny"
    (entries near 1e-30, so squares underflow), "zero", or "nonfinite" (one entry NaN or +-inf).
    """
    return draw(_rows(params, [draw(st.sampled_from(kinds)) for _ in range(batch_size)]))


@st.composite
def neighbouring_batches(
    draw,
    params: Any,
    *,
    max_batch: int = 6,
    relation: str = "add_remove",
    real_kinds: tuple[str, ...] = FINITE_ROW_KINDS,
    padding_kinds: tuple[str, ...] = ROW_KINDS,
) -> Neighbours:
    """Pairs of batches that differ in one example, for `relation` "add_remove" or "replace".

    Real rows are drawn from `real_kinds`, padded rows from `padding_kinds` (non-finite padding
    must not matter). For "add_remove", the neighbour deletes one real row or masks it out, and
    the two batches come in either order, so both adding and removing are drawn.
    """
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    size = draw(st.integers(1, max_batch))
    mask = draw(masks(size, min_real=1))
    kinds = [draw(st.sampled_from(real_kinds if real else padding_kinds)) for real in mask.tolist()]
    grads = draw(_rows(params, kinds))
    index = draw(st.sampled_from(torch.nonzero(mask).flatten().tolist()))
    if relation == "replace":
        fresh = draw(_rows(params, [draw(st.sampled_from(real_kinds))]))
        other = optree.tree_map(
            lambda g, f: torch.cat([g[:index], f, g[index + 1 :]]), grads, fresh
        )
        return Neighbours(grads, mask, other, mask.clone(), relation, index)
    if size > 1 and draw(st.booleans()):  # delete the row (an empty batch stays padded)
        other = optree.tree_map(lambda g: torch.cat([g[:index], g[index + 1 :]]), grads)
        other_mask = torch.cat([mask[:index], mask[index + 1 :]])
    else:
        other, other_mask = grads, mask.clone()
        other_mask[index] = False
    if draw(st.booleans()):  # the neighbour ADDS the example
        return Neighbours(other, other_mask, grads, mask, relation, index)
    return Neighbours(grads, mask, other, other_mask, relation, index)


@st.composite
def _rows(draw, params: Any, kinds: list[str]) -> Any:
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scales = [_scale_of(draw, kind) for kind in kinds]
    leaves, spec = optree.tree_flatten(params)
    bad_leaf = draw(st.integers(0, len(leaves) - 1))
    bad_value = draw(st.sampled_from((float("nan"), float("inf"), float("-inf"))))
    out = []
    for leaf_index, leaf in enumerate(leaves):
        shape = (len(kinds), *leaf.shape)
        values = torch.randn(shape, generator=gen, dtype=torch.float64)
        values = values * torch.tensor(scales, dtype=torch.float64).reshape(
            (-1,) + (1,) * leaf.dim()
        )
        for row, kind in enumerate(kinds):
            if kind == "nonfinite" and leaf_index == bad_leaf:
                values[row].view(-1)[0] = bad_value
        out.append(values.to(leaf.dtype))
    return optree.tree_unflatten(spec, out)


def _scale_of(draw, kind: str) -> float:
    if kind == "normal":
        return 10.0 ** draw(st.floats(-3, 3))
    if kind == "huge":
        return draw(st.sampled_from((1e6, 1e18, 1e30)))
    if kind == "tiny":
        return draw(st.sampled_from((1e-20, 1e-30)))
    if kind == "zero":
        return 0.0
    if kind == "nonfinite":
        return 1.0
    raise ValueError(f"row kind must be one of {ROW_KINDS}, got {kind!r}")

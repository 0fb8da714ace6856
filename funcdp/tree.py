"""Pytree helpers on optree for trees of tensors (gradients, parameters, states)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

from funcdp._certify import norms_upper, squares_upper

PyTree = Any


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Applies `fn` leaf-wise over one or more trees of the same structure."""
    return optree.tree_map(fn, tree, *rest)


def tree_leaves(tree: PyTree) -> list[Any]:
    """The leaves of `tree` in optree's canonical order."""
    return optree.tree_leaves(tree)


def tree_flatten(tree: PyTree) -> tuple[list[Any], Any]:
    """Leaves and the structure to rebuild the tree with `tree_unflatten`."""
    return optree.tree_flatten(tree)


def tree_unflatten(treespec: Any, leaves: list[Any]) -> PyTree:
    """Rebuilds a tree from its structure and leaves."""
    return optree.tree_unflatten(treespec, leaves)


def tree_zeros_like(tree: PyTree) -> PyTree:
    """A tree of zero tensors shaped like `tree`."""
    return tree_map(torch.zeros_like, tree)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise sum of two trees of tensors (one fused op over the leaves)."""
    leaves, spec = tree_flatten(a)
    others = spec.flatten_up_to(b)
    return tree_unflatten(spec, list(torch._foreach_add(leaves, others)) if leaves else [])


def tree_scale(tree: PyTree, factor: float | torch.Tensor) -> PyTree:
    """Every leaf of a tree of tensors multiplied by `factor` (one fused op over the leaves:
    on a GPU a step's per-leaf work costs a launch per leaf, which a small model's step is
    bound by)."""
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(spec, list(torch._foreach_mul(leaves, factor)) if leaves else [])


def tree_clone(tree: PyTree) -> PyTree:
    """A copy of `tree` whose tensor leaves share no storage with the original."""
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def global_norm(tree: PyTree) -> torch.Tensor:
    """The L2 norm of all leaves taken together, computed in float32 or wider."""
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.zeros(())
    squares = [torch.linalg.vector_norm(upcast_half(x)).square() for x in leaves]
    return torch.stack(squares).sum().sqrt()


def per_example_norms(tree: PyTree) -> torch.Tensor:
    """Upper bounds on the L2 norm of each example's slice of a tree whose leaves are [B, ...].

    Returns [B] in float32 (float64 if a leaf is float64), never below the exact norm: squares
    are summed in float32 blocks and float64 (`funcdp._certify`), and the result is rounded up.
    """
    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError("per_example_norms needs a tree with at least one leaf")
    squares = torch.stack([squares_upper(_rows(x)) for x in leaves]).sum(0)
    return norms_upper(squares, len(leaves), leaves)


def zero_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x with the rows (leading dimension) where `keep` is false replaced by zeros.

    Selected, not multiplied by zero, so that a row holding inf or NaN contributes exactly 0.
    """
    rows = keep.to(x.device).reshape((-1,) + (1,) * (x.dim() - 1))
    return torch.where(rows, x, torch.zeros((), dtype=x.dtype, device=x.device))


def batch_size_of(tree: PyTree) -> int:
    """The shared leading dimension of a per-example tree; raises if the leaves disagree."""
    sizes = {x.shape[0] for x in tree_leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(
            f"per-example leaves must share their leading dimension, got {sorted(sizes)}"
        )
    return sizes.pop()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] as [B, n], also for B = 0."""
    return x.flatten(1) if x.dim() > 1 else x[:, None]


def upcast_half(x: torch.Tensor) -> torch.Tensor:
    """x in float32 if it is float16 or bfloat16 (norms and sums are taken in float32)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def finite(x: torch.Tensor) -> torch.Tensor:
    """`torch.isfinite(x)` for floating x in two ops, not four: x - x is 0 exactly where x is
    finite and NaN where it is inf or NaN."""
    return (x - x) == 0


def all_finite(tensors) -> bool:
    """Whether every entry of every tensor is finite (one sum per tensor: inf and NaN survive
    summation; an overflowing sum only says "maybe not", which callers treat as a recheck).
    On a GPU the sums of absolute values are one fused launch; on the CPU, where that op loops,
    plain sums cost a third."""
    tensors = list(tensors)
    if not tensors:
        return True
    if tensors[0].is_cuda:
        sums = torch._foreach_norm(tensors, 1)
    else:
        sums = [t.sum() for t in tensors]
    return bool(finite(torch.stack([s.float() for s in sums])).all())

"""Pieces of one shape: a batch computed in pieces (a compiled step's buckets or micro-batches,
vmap chunks) of equal size.

One compiled graph serves every piece of its shape. And a kernel chosen by the number of rows
can round differently: if vmap chunks differed in size, an example could move from a short last
chunk into a full one when another example joins or leaves the batch, and be rounded otherwise
(`docs/sharp_edges.md`). So a last piece that the batch does not fill is padded with copies of
row 0, which are masked out or cut off again.
"""

from __future__ import annotations

import torch

from funcdp.tree import tree_leaves, tree_map


def piece(inputs: tuple, mask: torch.Tensor, start: int, size: int):
    """The inputs and mask of the `size` rows from `start`, padded (mask false) past the end."""
    if start + size <= mask.shape[0]:
        return tuple(x[start : start + size] for x in inputs), mask[start : start + size]
    rows, real = _rows(start, size, mask.shape[0], mask.device)
    return tuple(x[rows.to(x.device)] for x in inputs), mask[rows] & real


def in_whole_chunks(mapped, chunk_size: int | None, *rows):
    """`mapped(*rows)` (a `vmap(..., chunk_size=chunk_size)` over trees of [B, ...] tensors)
    with the rows padded by copies of row 0 to a whole number of chunks, so that every chunk is
    computed in one shape, and its outputs cut back to B rows. A batch of at most one chunk is
    one chunk already."""
    size = tree_leaves(rows)[0].shape[0]
    if chunk_size is None or size % chunk_size == 0 or size < chunk_size:
        return mapped(*rows)
    index, _ = _rows(0, -(-size // chunk_size) * chunk_size, size, tree_leaves(rows)[0].device)
    out = mapped(*tree_map(lambda x: x[index.to(x.device)], rows))
    return tree_map(lambda y: y[:size], out)


def _rows(start: int, size: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of rows start..start+size of a batch of `length` (0 past its end), and which
    of them are in it."""
    rows = torch.arange(start, start + size, device=device)
    real = rows < length
    return torch.where(real, rows, 0), real

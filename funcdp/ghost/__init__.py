"""Ghost clipping with book-keeping: clipped per-example gradient sums in one pass, no hooks.

`ghost_clipped_sum(loss_fn, max_norm=... | factor_fn=..., groups=...)` returns
`fn(params, *batch, mask=None) -> GhostResult(grads, norms, group_norms, losses, clipped)`; its
factor rule maps norms [B, G] to factors [B, G] as `clip_by`'s does. It is the engine that
`funcdp.clipped_sum(mode="ghost")` and the train step's ghost mode run.
"""

from funcdp.ghost.clipped_sum import GhostResult, ghost_clipped_sum

__all__ = ["GhostResult", "ghost_clipped_sum"]

"""The drafter protocol (`specdec.drafter`, re-exported here) and helpers drafters share.

The contract itself, with every hook the loop calls and the optional ones' defaults, is
`specdec.drafter`; the committed history is `specdec.context.Context`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from specdec.context import Context
from specdec.drafter import AdaptiveDrafter, Drafter, DraftState, Taps
from specdec.tree import Tree

__all__ = ["AdaptiveDrafter", "Context", "DraftState", "Drafter", "Taps", "logits_by_depth"]


def logits_by_depth(logits: Float[Array, "B K V"], tree: Tree, frontier: Int[Array, "B F"], first: int = 0):
    """The parallel-heads `expand`: frontier node at depth d gets `logits[:, first + d]` (clipped
    to the last one; such drafters declare `max_depth`, so the loop refuses deeper trees). Medusa,
    Amphista (first = 0: head d drafts depth d + 1) and DFlash (first = 1: block position d + 1)
    serve every builder this way."""
    depth = jnp.take_along_axis(tree.depth, frontier, axis=1)
    pos = jnp.clip(depth + first, first, logits.shape[1] - 1)
    return jnp.take_along_axis(logits, pos[:, :, None], axis=1)

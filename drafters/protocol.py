"""The drafter protocol (`specdec.drafter`, re-exported here) and helpers drafters share.

The contract itself, with every hook the loop calls and the optional ones' defaults, is
`specdec.drafter`; the committed history is `specdec.context.Context`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from specdec.context import Context
from specdec.drafter import AdaptiveDrafter, Drafter, DraftState, Taps
from specdec.sampling import process_logits
from specdec.tree import Tree

__all__ = [
    "AdaptiveDrafter",
    "Context",
    "DraftState",
    "Drafter",
    "Taps",
    "by_node_depth",
    "logits_by_depth",
    "node_confidence",
    "parallel_confidence",
    "parent_confidence",
    "token_confidence",
]


def logits_by_depth(logits: Float[Array, "B K V"], tree: Tree, frontier: Int[Array, "B F"], first: int = 0):
    """The parallel-heads `expand`: frontier node at depth d gets `logits[:, first + d]` (clipped
    to the last one; such drafters declare `max_depth`, so the loop refuses deeper trees). Medusa,
    Amphista (first = 0: head d drafts depth d + 1) and DFlash (first = 1: block position d + 1)
    serve every builder this way."""
    depth = jnp.take_along_axis(tree.depth, frontier, axis=1)
    pos = jnp.clip(depth + first, first, logits.shape[1] - 1)
    return jnp.take_along_axis(logits, pos[:, :, None], axis=1)


def by_node_depth(table: Float[Array, "B K ..."], tree: Tree, nodes: Int[Array, "B F"], first: int = 0):
    """For parallel drafters: the entry of `table` that drafted each node, `table[:, first + d - 1]`
    for a node at depth d >= 1 (clipped to the table; `logits_by_depth` handed out the logits
    `table[:, first + d - 1]` to the node's parent)."""
    depth = jnp.take_along_axis(tree.depth, nodes, axis=1)
    pos = jnp.clip(depth - 1 + first, first, table.shape[1] - 1)
    idx = pos.reshape(pos.shape + (1,) * (table.ndim - 2))
    return jnp.take_along_axis(table, idx, axis=1)


def node_confidence(tree: Tree, nodes: Int[Array, "B F"]) -> Float[Array, "B F"]:
    """q(token) of each node under the builder's sampling, from the tree's path scores
    (`Tree.score`, log q along the path): exp(score[node] - score[parent])."""
    parent = jnp.maximum(jnp.take_along_axis(tree.parents, nodes, axis=1), 0)
    at = lambda i: jnp.take_along_axis(tree.score, i, axis=1)  # noqa: E731
    return jnp.exp(at(nodes) - at(parent))


def parallel_confidence(logits: Float[Array, "B K V"], tree: Tree, nodes: Int[Array, "B F"], sampling,
                        first: int = 0) -> Float[Array, "B F"]:  # fmt: skip
    """q(token) of each node of a parallel drafter: `node_confidence` when the tree records path
    scores, else the drafting head's distribution under `sampling` at the node's token."""
    if tree.score is not None:
        return node_confidence(tree, nodes)
    return token_confidence(by_node_depth(logits, tree, nodes, first), tree, nodes, sampling)


def token_confidence(logits: Float[Array, "B F V"], tree: Tree, nodes: Int[Array, "B F"], sampling
                     ) -> Float[Array, "B F"]:  # fmt: skip
    """q(token) of each node from the logits that drafted it, under `sampling` (greedy: the plain
    softmax)."""
    probs = jax.nn.softmax(logits if sampling.greedy else process_logits(logits, sampling), axis=-1)
    tok = jnp.take_along_axis(jnp.where(tree.valid, tree.tokens, 0), nodes, axis=1)
    return jnp.take_along_axis(probs, tok[:, :, None], axis=-1)[..., 0]


def parent_confidence(logits_of, out: Float[Array, "B W D"], tree: Tree, nodes: Int[Array, "B F"], sampling
                      ) -> Float[Array, "B F"]:  # fmt: skip
    """q(token) of each node: its parent's draft distribution under `sampling` (greedy: the plain
    softmax) at the node's token. From the tree's path scores when the builder records them
    (`node_confidence`), else `logits_of` the parent's feature in `out` (the per-node features)."""
    if tree.score is not None:
        return node_confidence(tree, nodes)
    parent = jnp.maximum(jnp.take_along_axis(tree.parents, nodes, axis=1), 0)
    lg = logits_of(jnp.take_along_axis(out, parent[:, :, None], axis=1))
    return token_confidence(lg, tree, nodes, sampling)

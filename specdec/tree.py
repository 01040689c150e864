"""The draft Tree pytree and what derives from it under jit: ancestor mask, positions, root paths.

A tree is a static budget of N node slots per row. Node 0 is the root: the row's last committed
token, whose KV is not in the target cache yet. Every other valid node i has `parents[i] < i`
(topological order), `depth[i] = depth[parents[i]] + 1`, and the children of a node appear in
increasing index in the order they were drafted (a verifier processes siblings in that order).
Unused slots have `valid = False`, `tokens = PAD` (never a real token id), `parents = -1`.

`draft_probs[b, i]` is the draft distribution the children of node i were drawn from (after the
same `SamplingConfig` processing as the target), so it lines up with `target_logits[b, i]`, the
target's next-token distribution after node i. `score` (optional) is the path's cumulative draft
log-prob, which `specdec.trees.budget` ranks nodes by. `sibling_mode` says how children were drawn:

  "deterministic"        chosen by rank (top-k, greedy, lookup) — verifiers treat q as one-hot;
  "without_replacement"  sampled from q without replacement, in index order (Gumbel-top-k);
  "iid"                  independent samples from q (duplicates possible).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

PAD = -1
SIBLING_MODES = ("deterministic", "without_replacement", "iid")


@flax.struct.dataclass
class Tree:
    tokens: Int[Array, "B N"]
    parents: Int[Array, "B N"]
    depth: Int[Array, "B N"]
    valid: Bool[Array, "B N"]
    draft_probs: Float[Array, "B N V"] | None = None
    max_depth: int = flax.struct.field(pytree_node=False, default=0)
    sibling_mode: str = flax.struct.field(pytree_node=False, default="deterministic")
    # Cumulative draft log-prob of each node's path (root 0; `trees.topk.draft_logprobs`, so raw
    # log-softmax at T = 0): how confident the drafter is. Optional; a batch budget ranks by it.
    score: Float[Array, "B N"] | None = None
    # Drafter calls (begin + expands) that built this tree, when the builder counts them (adaptive
    # lengths stop early); the decode loop sums them per step.
    draft_calls: Int[Array, ""] | None = None

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def empty(cls, root: Int[Array, " B"], num_nodes: int, max_depth: int, **kw) -> Tree:
        """A tree holding only the root; builders fill the other slots."""
        b = root.shape[0]
        return cls(
            tokens=jnp.full((b, num_nodes), PAD, jnp.int32).at[:, 0].set(root),
            parents=jnp.full((b, num_nodes), -1, jnp.int32),
            depth=jnp.zeros((b, num_nodes), jnp.int32),
            valid=jnp.zeros((b, num_nodes), bool).at[:, 0].set(True),
            max_depth=max_depth,
            **kw,
        )

    @classmethod
    def chain(cls, tokens: Int[Array, "B N"], **kw) -> Tree:
        """A linear tree: node i's parent is i - 1 (node 0 the root)."""
        b, n = tokens.shape
        idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        return cls(
            tokens=tokens, parents=idx - 1, depth=idx, valid=jnp.ones((b, n), bool), max_depth=n - 1, **kw
        )


def ancestor_mask(tree: Tree) -> Bool[Array, "B N N"]:
    """mask[b, i, j] = node j is node i or one of its ancestors (what node i attends to in the block).

    Built by `max_depth` rounds of `anc |= anc[parent]`; invalid nodes see only themselves.
    """
    n = tree.num_nodes
    eye = jnp.eye(n, dtype=bool)
    parent_row = jax.nn.one_hot(tree.parents, n, dtype=bool)  # [B, N, N]; -1 -> all False
    anc = eye | (parent_row & tree.valid[..., None])
    for _ in range(max(tree.max_depth - 1, 0)):
        # anc[i] |= anc[parent[i]]
        anc = anc | jnp.any(parent_row[..., :, :, None] & anc[..., None, :, :], axis=-2)
    return anc


def ancestor_closed(
    keep: Bool[Array, "B N"], parents: Int[Array, "B N"], max_depth: int
) -> Bool[Array, "B N"]:
    """`keep` with every node dropped whose path from the root is not wholly kept (node 0, the
    root, always kept): `max_depth` rounds of `keep &= keep[parent]`. For selecting a subtree."""
    is_root = jnp.arange(keep.shape[1])[None, :] == 0
    keep = keep | is_root
    par = jnp.maximum(parents, 0)
    for _ in range(max_depth):
        keep = keep & (is_root | jnp.take_along_axis(keep, par, axis=1))
    return keep


def compact(tree: Tree) -> Tree:
    """The same tree with its valid nodes moved to the front, in their order (parents still precede
    children, siblings keep their drafting order) and parents reindexed; invalid slots follow. A
    verification block of the first `max(valid count)` slots then holds every row's tree."""
    n = tree.num_nodes
    order = jnp.argsort(jnp.where(tree.valid, 0, n) + jnp.arange(n), axis=1)  # new slot i <- old order[i]
    new_of = jnp.argsort(order, axis=1)  # old slot j -> new slot
    take = lambda x: (
        None
        if x is None
        else jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
    )
    parents = take(tree.parents)
    parents = jnp.where(parents >= 0, jnp.take_along_axis(new_of, jnp.maximum(parents, 0), axis=1), -1)
    return tree.replace(
        tokens=take(tree.tokens), parents=parents, depth=take(tree.depth), valid=take(tree.valid),
        draft_probs=take(tree.draft_probs), score=take(tree.score),
    )  # fmt: skip


def positions(tree: Tree, lengths: Int[Array, " B"]) -> Int[Array, "B N"]:
    """RoPE positions: committed length + depth (siblings share a position)."""
    return lengths[:, None] + tree.depth


def root_paths(tree: Tree, anc: Bool[Array, "B N N"] | None = None) -> Int[Array, "B N D1"]:
    """paths[b, i, d] = the ancestor of node i at depth d (d <= depth[i]); 0 past the node's depth.

    Every node is a potential leaf, so this is the table a verifier reads an accepted path from.
    """
    anc = ancestor_mask(tree) if anc is None else anc
    d = jnp.arange(tree.max_depth + 1)
    at_depth = anc[..., None] & (tree.depth[:, None, :, None] == d)  # [B, N(node), N(anc), D1]
    return jnp.argmax(at_depth, axis=2).astype(jnp.int32)


def child_mask(tree: Tree) -> Bool[Array, "B N N"]:
    """mask[b, i, j] = node j is a valid child of node i."""
    n = tree.num_nodes
    return (tree.parents[:, None, :] == jnp.arange(n)[None, :, None]) & tree.valid[:, None, :]

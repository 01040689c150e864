"""Batch-wide draft budgets in the loop: prune a batch's trees to its most useful drafts.

On a compute-bound target (a CPU at batch 8, a GPU at batch 64+) a verification block costs about
its number of tokens, and a fixed tree per row spends most of them on rows whose drafts will be
rejected. A builder that declares `budget = M` (`specdec.trees.BatchBudget`) has the loop keep
only the batch's M most useful drafted nodes over all rows (plus every root) and run the target
forward on those `B + M` block tokens alone, a flattened ragged block
(`specdec.models.llama.forward(compact=...)`). A row without kept drafts verifies its root alone
(an AR step for that row) inside the same forward. Rows are weighed by `lag_priority`: a batch
runs until its slowest row is done, so drafts for rows ahead buy no time.

Which nodes are kept, and why it stays lossless:

  * deterministic siblings (temperature 0, or rank-chosen children at T > 0: the verifier treats q
    as a point mass): the top M nodes by `Tree.score`, the path's cumulative draft log-prob (a
    child never outscores its parent; ties go to the lower node index, then the lower row), then
    closed under ancestors. Any draft set chosen from the drafter's side alone is verified
    losslessly when drafts are deterministic. Trees without scores rank nodes by depth.
  * sampled siblings (Gumbel-top-k, chains with `,sample`): dropping a sampled node because of its
    own draft probability would bias which tokens reach the verifier, so whole rows are kept or
    dropped, by the drafter's confidence before sampling (the top probability at the root), in
    order while their trees fit the budget.

The budget and the `[B, N]` tree are static, so every shape is too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from specdec.tree import PAD, Tree, ancestor_closed


def _node_keep(tree: Tree, tokens: int, prio: Float[Array, " B"]) -> Bool[Array, "B N"]:
    """The `tokens` best non-root nodes of the batch by score + row priority, ancestor-closed."""
    b, n = tree.tokens.shape
    score = -tree.depth.astype(jnp.float32) if tree.score is None else tree.score
    score = jnp.where(tree.valid, score + prio[:, None], -jnp.inf)[:, 1:]
    # Order by score, then node index, then row: transpose so the flat index runs rows fastest.
    flat = score.T.reshape(-1)
    _, idx = jax.lax.top_k(flat, min(tokens, flat.shape[0]))
    sel = jnp.isfinite(flat[idx])
    keep = jnp.zeros(flat.shape, bool).at[idx].set(sel).reshape(n - 1, b).T
    keep = jnp.concatenate([jnp.ones((b, 1), bool), keep], axis=1) & tree.valid
    return ancestor_closed(keep, tree.parents, tree.max_depth)


def _row_keep(tree: Tree, tokens: int, prio: Float[Array, " B"]) -> Bool[Array, "B N"]:
    """Whole rows by priority, then confidence (top draft probability at the root), while they fit."""
    b, n = tree.tokens.shape
    size = jnp.sum(tree.valid, axis=1) - 1  # drafted nodes per row
    conf = jnp.zeros((b,)) if tree.draft_probs is None else jnp.max(tree.draft_probs[:, 0], axis=-1)
    order = jnp.lexsort((-conf, -prio))  # the last key is the primary one
    fits = (jnp.cumsum(size[order]) <= tokens) & jnp.isfinite(prio[order])
    row_ok = jnp.zeros((b,), bool).at[order].set(fits)
    return jnp.where(row_ok[:, None], tree.valid, jnp.arange(n)[None, :] == 0)


def prune(tree: Tree, tokens: int, row_priority: Float[Array, " B"] | None = None) -> Tree:
    """`tree` with all but `tokens` drafted nodes of the whole batch made invalid (see the module doc).

    `row_priority` (log-prob units, added to every node's score of the row; -inf: the row drafts
    nothing) must not depend on this step's drafts or the target. Invariant: `sum(valid) <= B +
    tokens`, ancestor-closed, kept nodes unchanged."""
    prio = jnp.zeros(tree.tokens.shape[:1]) if row_priority is None else row_priority.astype(jnp.float32)
    deterministic = tree.sibling_mode == "deterministic"
    keep = _node_keep(tree, tokens, prio) if deterministic else _row_keep(tree, tokens, prio)
    return tree.replace(
        tokens=jnp.where(keep, tree.tokens, PAD),
        parents=jnp.where(keep, tree.parents, -1),
        depth=jnp.where(keep, tree.depth, 0),
        valid=keep,
        score=None if tree.score is None else jnp.where(keep, tree.score, -jnp.inf),
    )


def lag_priority(generated: Int[Array, " B"], max_new: Int[Array, ""] | int, done: Bool[Array, " B"]):
    """Row priority for a static batch, which runs until its slowest row is done: drafts pay only on
    the rows furthest behind. One token of lag weighs like a factor e of draft confidence; finished
    rows draft nothing. Depends only on the committed history (lossless)."""
    remaining = (max_new - generated).astype(jnp.float32)
    lag = remaining - jnp.max(jnp.where(done, -jnp.inf, remaining))
    return jnp.where(done, -jnp.inf, lag)

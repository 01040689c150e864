"""A batch-wide draft budget: every row drafts its tree, the batch verifies at most `tokens` drafts.

On a compute-bound target (a CPU at batch 8, a GPU at batch 64+) a verification block costs about
its number of tokens, and a fixed tree per row spends most of them on rows whose drafts will be
rejected. `BatchBudget(inner, tokens)` wraps any builder: each row drafts `inner`'s tree, then the
batch keeps its `tokens` most confident drafted nodes over all rows (plus every root) and drops the
rest. The decode loop prunes (`prune`) and runs the target forward on those `B + tokens` block
tokens only — a flattened ragged block (`specdec.models.llama.forward(compact=...)`): the matmuls
run on the kept tokens, attention on the usual `[B, N]` layout. A row without confident drafts
verifies its root alone, an AR step for that row, inside the same forward. Rows are weighed by
`lag_priority`: a batch runs until its slowest row is done, so drafts for rows ahead buy no time.

Which nodes are kept, and why it stays lossless:

  * deterministic siblings (temperature 0, or rank-chosen children at T > 0: the verifier treats q
    as a point mass): the top `tokens` nodes by `Tree.score`, the path's cumulative draft log-prob
    (a child never outscores its parent; ties go to the lower node index, then the lower row), then
    closed under ancestors. Any draft set chosen from the drafter's side alone is verified
    losslessly when drafts are deterministic. Trees without scores rank nodes by depth.
  * sampled siblings (Gumbel-top-k, iid, chains with `,sample`): dropping a sampled node because of
    its own draft probability would bias which tokens reach the verifier, so whole rows are kept
    or dropped, by the drafter's confidence before sampling (the top probability at the root), in
    order while their trees fit the budget.

The budget and the `[B, N]` tree are static, so every shape is too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from specdec.drafters.protocol import Context, Drafter, DraftState
from specdec.sampling import SamplingConfig
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


@dataclasses.dataclass(frozen=True)
class BatchBudget:
    """`inner`'s tree per row, at most `tokens` drafted nodes verified over the whole batch."""

    inner: Any  # a TreeBuilder
    tokens: int

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"a batch budget needs at least 1 draft token, got {self.tokens}")
        if isinstance(self.inner, BatchBudget):
            raise ValueError("a batch budget cannot wrap another batch budget")

    @property
    def budget(self) -> int:
        return self.tokens

    @property
    def num_nodes(self) -> int:
        return self.inner.num_nodes

    @property
    def max_depth(self) -> int:
        return self.inner.max_depth

    @property
    def window(self) -> int:
        return self.inner.window

    @property
    def spec(self) -> str:
        return f"{self.inner.spec}+budget:{self.tokens}"

    def __call__(
        self, drafter: Drafter, params, state: DraftState, ctx: Context, key: PRNGKeyArray,
        sampling: SamplingConfig,
    ) -> tuple[Tree, DraftState]:  # fmt: skip
        # The whole tree per row: the decode loop prunes it (`prune`), since it knows which rows
        # are done and which lag (the priority of `lag_priority`).
        return self.inner(drafter, params, state, ctx, key, sampling)


def lag_priority(generated: Int[Array, " B"], max_new: Int[Array, ""] | int, done: Bool[Array, " B"]):
    """Row priority for a static batch, which runs until its slowest row is done: drafts pay only on
    the rows furthest behind. One token of lag weighs like a factor e of draft confidence; finished
    rows draft nothing. Depends only on the committed history (lossless)."""
    remaining = (max_new - generated).astype(jnp.float32)
    lag = remaining - jnp.max(jnp.where(done, -jnp.inf, remaining))
    return jnp.where(done, -jnp.inf, lag)

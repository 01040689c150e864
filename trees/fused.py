"""Fused trees (RASD): a model drafter's tree with retrieval candidates merged in by longest prefix.

`FusedTree(inner, paths, length)` drafts `inner` (any builder) with a fused drafter
(`specdec.drafters.fused.Fused`), asks the drafter's retrieval sources for up to `paths`
candidate continuations of at most `length` tokens, and merges them into the tree:

1. prune: a candidate is kept iff its first token is among the model's `topk` most likely at the
   root or has draft probability >= `theta` there (RASD's pruning by the draft model's
   distribution; raw log-softmax at temperature 0, the processed distribution above; `theta=0`
   keeps every candidate);
2. merge, candidates in rank order: walk the tree from the root along the candidate's tokens while
   a child with the next token exists (the model's nodes and earlier candidates' alike: longest
   prefix matching, so shared prefixes are never duplicated), then append the rest as a chain of
   new nodes under the last matched one;
3. new nodes take the `paths * length` slots after the inner tree's (the extra node budget); a
   candidate that runs out of slots is cut there. The tree is then compacted (valid nodes first)
   and verified in the smallest compiled width that holds it (`widths`): without a hit the block
   is the inner tree's own.

Siblings. Retrieval nodes were not drawn from any draft distribution, so the fused tree declares
"deterministic" siblings at every temperature: verifiers treat every child's q as one-hot
(`target_only`, which `auto` and `rrs` use for such trees), lossless for any children chosen
without the target's randomness. Verifiers that need sampled siblings (SpecInfer, SpecTr) are
refused before compiling. A node that gains retrieval children without having been expanded
by the model records the point mass on its first retrieval child as its draft distribution (as
n-gram lookup drafts); new nodes carry a path score of their parent's plus `log(RETRIEVAL_Q)` per
token (what a batch budget ranks). At temperature 0 no draft distribution is kept (greedy
verification reads none).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from specdec import builder as builder_contract
from specdec import drafter as drafter_contract
from specdec.context import Context
from specdec.sampling import SamplingConfig
from specdec.tree import PAD, Tree, compact
from specdec.trees.budget import BatchBudget
from specdec.trees.topk import draft_logprobs

RETRIEVAL_Q = 0.5  # the per-token confidence a retrieval node's path score assumes (batch budgets)


def _pad_slots(x, extra: int, fill):
    if x is None:
        return None
    pad = [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=fill)


def fuse_paths(
    tree: Tree, tokens: Int[Array, "B R L"], ok: Bool[Array, "B R L"], extra: int, max_depth: int
) -> tuple[Tree, Bool[Array, "B N"]]:
    """`tree` with `extra` more slots, the candidate paths merged in by longest prefix (module doc,
    step 2-3), and the mask of the nodes added. Not compacted: the inner tree keeps its indices."""
    b, n0 = tree.tokens.shape
    n = n0 + extra
    score = tree.score if tree.score is not None else jnp.zeros((b, n0), jnp.float32)
    tree = tree.replace(
        tokens=_pad_slots(tree.tokens, extra, PAD), parents=_pad_slots(tree.parents, extra, -1),
        depth=_pad_slots(tree.depth, extra, 0), valid=_pad_slots(tree.valid, extra, False),
        draft_probs=_pad_slots(tree.draft_probs, extra, 0.0), score=_pad_slots(score, extra, 0.0),
        max_depth=max_depth,
    )  # fmt: skip
    rows = jnp.arange(b)
    step_logq = math.log(RETRIEVAL_Q)
    free = jnp.full((b,), n0, jnp.int32)
    for r in range(tokens.shape[1]):
        cur = jnp.zeros((b,), jnp.int32)  # the node the candidate has reached (the root)
        alive = jnp.ones((b,), bool)
        for j in range(tokens.shape[2]):
            tok = tokens[:, r, j]
            live = alive & ok[:, r, j]
            hit = (tree.parents == cur[:, None]) & tree.valid & (tree.tokens == tok[:, None])
            found = jnp.any(hit, axis=1)
            add = live & ~found & (free < n)
            slot = jnp.where(add, free, n)  # out of range: dropped
            tree = tree.replace(
                tokens=tree.tokens.at[rows, slot].set(tok, mode="drop"),
                parents=tree.parents.at[rows, slot].set(cur, mode="drop"),
                depth=tree.depth.at[rows, slot].set(j + 1, mode="drop"),
                valid=tree.valid.at[rows, slot].set(True, mode="drop"),
                score=tree.score.at[rows, slot].set(tree.score[rows, cur] + step_logq, mode="drop"),
            )  # fmt: skip
            if tree.draft_probs is not None:  # an unexpanded parent: q = the retrieval's point mass
                empty = jnp.sum(tree.draft_probs[rows, cur], axis=-1) == 0
                at = jnp.where(add & empty, cur, n)
                onehot = jax.nn.one_hot(tok, tree.draft_probs.shape[-1], dtype=tree.draft_probs.dtype)
                tree = tree.replace(draft_probs=tree.draft_probs.at[rows, at].set(onehot, mode="drop"))
            cur = jnp.where(found, jnp.argmax(hit, axis=1), jnp.where(add, free, cur)).astype(jnp.int32)
            free = free + add
            alive = live & (found | add)
    added = jnp.arange(n)[None, :] >= n0
    return tree, added & tree.valid


def prune_candidates(
    root_logits, tokens: Int[Array, "B R L"], ok: Bool[Array, "B R L"], sampling: SamplingConfig, topk: int,
    theta: float,
) -> Bool[Array, "B R L"]:  # fmt: skip
    """`ok` with the candidates dropped whose first token the model finds unlikely at the root:
    kept iff it is in the model's top-`topk` there or its draft probability is >= `theta`."""
    if theta <= 0.0:
        return ok
    logq = draft_logprobs(root_logits, sampling)  # [B, V]
    first = jnp.take_along_axis(logq, tokens[:, :, 0], axis=1)  # [B, R]
    kth = jax.lax.top_k(logq, topk)[0][:, -1:]
    keep = (first >= kth) | (first >= math.log(theta))
    return ok & keep[:, :, None]


@dataclasses.dataclass(frozen=True)
class FusedTree:
    """`inner`'s tree with up to `paths` retrieval candidates of up to `length` tokens fused in."""

    inner: Any  # a TreeBuilder
    paths: int = 2
    length: int = 4
    topk: int = 4
    theta: float = 0.0  # 0: no pruning

    def __post_init__(self):
        if isinstance(self.inner, (FusedTree, BatchBudget)):
            raise ValueError("fusion wraps a drafted tree; put +budget after it (TREE+fused+budget:M)")
        if self.paths < 1 or self.length < 1:
            raise ValueError(f"fusion needs paths >= 1 and len >= 1, got {self.paths} and {self.length}")
        if not 0.0 <= self.theta < 1.0 or self.topk < 1:
            raise ValueError(f"fusion pruning needs 0 <= theta < 1, topk >= 1; got {self.theta}, {self.topk}")

    @property
    def fuses(self) -> tuple[int, int]:
        """(paths, length) of the retrieval candidates it merges (a fused drafter's `retrieval`)."""
        return self.paths, self.length

    @property
    def extra(self) -> int:
        """Node slots added for retrieval nodes: the documented extra budget."""
        return self.paths * self.length

    @property
    def num_nodes(self) -> int:
        return self.inner.num_nodes + self.extra

    @property
    def max_depth(self) -> int:
        return max(self.inner.max_depth, self.length)

    @property
    def model_depth(self) -> int:
        """The depth the model drafter is asked to draft (the inner tree's)."""
        return self.inner.max_depth

    @property
    def window(self) -> int:
        return max(self.inner.window, self.inner.num_nodes) + self.extra

    @property
    def widths(self) -> tuple[int, ...]:
        inner = builder_contract.option(self.inner, "widths") or (self.inner.num_nodes,)
        n0 = self.inner.num_nodes
        return tuple(sorted(set(inner) | {n0 + self.length * k for k in range(1, self.paths + 1)}))

    @property
    def spec(self) -> str:
        opts = f"paths={self.paths},len={self.length}"
        if self.theta:
            opts += f",topk={self.topk},theta={self.theta:g}"
        return f"{self.inner.spec}+fused:{opts}"

    def sibling_mode(self, sampling: SamplingConfig) -> str:
        return "deterministic"

    def __call__(
        self, drafter, params, state, ctx: Context, key: PRNGKeyArray, sampling: SamplingConfig
    ) -> tuple[Tree, Any]:
        tree, state = self.inner(drafter, params, state, ctx, key, sampling)
        if tree.draft_calls is None:  # the loop would count this tree's depth, not the model's
            tree = tree.replace(draft_calls=jnp.asarray(self.inner.max_depth, jnp.int32))
        if sampling.greedy:  # greedy verification reads no draft distribution: skip moving [B, N, V]
            tree = tree.replace(draft_probs=None)
        tokens, ok = drafter.retrieve(params, state, ctx)
        ok = prune_candidates(state.root_logits, tokens, ok, sampling, self.topk, self.theta)
        tree, _ = fuse_paths(tree, tokens[:, : self.paths, : self.length], ok[:, : self.paths, : self.length],
                             self.extra, self.max_depth)  # fmt: skip
        return compact(tree.replace(sibling_mode="deterministic")), state


def fit(builder, drafter):
    """The builder a drafter needs: for a fused drafter (`specdec.drafter`: `fused`), `builder`
    fused with its candidates' paths and length (inside a batch budget if there is one; a
    `FusedTree` given takes the drafter's paths and length); `builder` itself otherwise."""
    fused = drafter_contract.option(drafter, "fused")
    if fused is None:
        return builder
    if isinstance(builder, BatchBudget):
        return BatchBudget(fit(builder.inner, drafter), builder.tokens)
    if isinstance(builder, FusedTree):
        return dataclasses.replace(builder, paths=fused[0], length=fused[1])
    return FusedTree(builder, *fused)

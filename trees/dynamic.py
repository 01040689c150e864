"""Dynamic trees whose shape follows the draft's confidence: EAGLE-2 and DySpec.

Both score a node by the cumulative draft log-prob of its path (`topk.draft_logprobs`: raw
log-softmax at temperature 0, the processed distribution at T > 0), draft children by rank
(sibling_mode "deterministic", so verifiers treat q as one-hot; reference notes B3.3), and end
with the same rerank: the best `num_nodes - 1` candidates by score, reindexed into a compact tree
in topological order with siblings in rank order (`pool.finalize`).

Candidates are kept in a pool; only expanded candidates get a working slot the drafter writes
(`pool` docstring), so `window = max(num_nodes, 1 + number of expanded nodes)`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from specdec.context import Context
from specdec.drafter import Drafter, DraftState
from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.trees.pool import expand_entries, finalize, init_pool


def _check_positive(**kw: int) -> None:
    for name, v in kw.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2's `topK_genrate` (reference notes A2.1): beam expansion, then global rerank.

    Round 1 drafts the root's top-`topk` children. Each later round (up to `depth` rounds in
    all) expands the `topk` best candidates of the previous round by cumulative score (one
    drafter call), each giving its top-`topk` children. Then the best `num_nodes - 1` of all
    `topk + (depth - 1) * topk**2` candidates (expanded or not) form the tree.

    `depth` here is the maximum draft length, i.e. EAGLE's `depth` argument + 1 (EAGLE counts
    expansion rounds after the first). Drafter calls: `begin` + `depth - 1` expands of F = topk.
    """

    depth: int = 5
    topk: int = 8
    num_nodes: int = 32

    def __post_init__(self):
        _check_positive(depth=self.depth, topk=self.topk, num_nodes=self.num_nodes)
        if not 2 <= self.num_nodes <= self.candidates + 1:
            raise ValueError(
                f"num_nodes must be in [2, {self.candidates + 1}] for depth={self.depth}, "
                f"topk={self.topk} (1 + number of candidates), got {self.num_nodes}"
            )

    @property
    def candidates(self) -> int:
        """Drafted candidates, root excluded."""
        return self.topk + (self.depth - 1) * self.topk**2

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def window(self) -> int:
        return max(self.num_nodes, 1 + (self.depth - 1) * self.topk)

    @property
    def spec(self) -> str:
        return f"dynamic:depth={self.depth},topk={self.topk},n={self.num_nodes}"

    def sibling_mode(self, sampling: SamplingConfig) -> str:
        return "deterministic"  # top-k children at every temperature

    def __call__(
        self,
        drafter: Drafter,
        params,
        state: DraftState,
        ctx: Context,
        key: PRNGKeyArray,
        sampling: SamplingConfig,
    ) -> tuple[Tree, DraftState]:
        """Build the tree from `ctx.root` (deterministic: `key` is unused)."""
        del key
        k = self.topk
        logits, state = drafter.begin(params, state, ctx)
        pool = init_pool(ctx.root, logits, sampling, 1 + self.candidates, self.window, self.depth, k)
        prev, size = 1, k  # entry block of the previous round
        for r in range(2, self.depth + 1):
            _, best = jax.lax.top_k(pool.score[:, prev : prev + size], k)  # the next frontier
            base = 1 + k + (r - 2) * k * k
            pool, state = expand_entries(
                drafter, params, state, ctx, pool, best + prev, 1 + (r - 2) * k, base, sampling, k
            )
            prev, size = base, k * k
        return finalize(pool, self.num_nodes, self.depth), state


@dataclasses.dataclass(frozen=True)
class DySpecTree:
    """DySpec-style greedy expansion (reference notes A2.3; paper details unverified).

    The pool starts with the root's top-`topk` children. Each of `rounds` drafter calls expands
    the `per_call` not-yet-expanded candidates with the largest cumulative draft probability,
    adding each one's top-`topk` children; then the best `num_nodes - 1` candidates form the tree.

    With `per_call = 1` and the default `rounds = num_nodes - 2` this is exact best-first search
    (a heap by path probability, as the paper describes): the tree is the `num_nodes - 1` most
    probable paths of the draft's top-`topk`-per-node tree. `per_call > 1` expands several nodes
    per call (fewer, wider drafter calls; default rounds `ceil((num_nodes - 2) / per_call)`), and
    is then only approximately greedy. Simplifications vs. the paper: children are capped at
    `topk` per node; children are the deterministic top-k (not samples), because with sampled
    children the number kept would depend on the sampled tokens' probabilities, which biases
    recursive rejection sampling; verify with a one-hot (target-only) verifier.
    """

    num_nodes: int = 16
    topk: int = 8
    per_call: int = 1
    rounds: int | None = None

    def __post_init__(self):
        _check_positive(num_nodes=self.num_nodes, topk=self.topk, per_call=self.per_call)
        if self.num_nodes < 2:
            raise ValueError(f"num_nodes must be >= 2, got {self.num_nodes}")
        if self.per_call > self.topk:
            raise ValueError(f"per_call ({self.per_call}) must be <= topk ({self.topk})")
        if self.rounds is None:
            object.__setattr__(self, "rounds", math.ceil((self.num_nodes - 2) / self.per_call))
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"rounds must be an int >= 0, got {self.rounds!r}")
        if self.num_nodes - 1 > self.capacity - 1:
            raise ValueError(
                f"num_nodes={self.num_nodes} exceeds the {self.capacity - 1} candidates drafted by "
                f"topk={self.topk}, per_call={self.per_call}, rounds={self.rounds}"
            )

    @property
    def capacity(self) -> int:
        """Pool entries: root + topk children per expanded node."""
        return 1 + self.topk * (1 + self.rounds * self.per_call)

    @property
    def max_depth(self) -> int:
        return min(self.num_nodes - 1, self.rounds + 1)

    @property
    def window(self) -> int:
        return max(self.num_nodes, 1 + self.rounds * self.per_call)

    @property
    def spec(self) -> str:
        return f"dyspec:n={self.num_nodes},topk={self.topk},per_call={self.per_call},rounds={self.rounds}"

    def sibling_mode(self, sampling: SamplingConfig) -> str:
        return "deterministic"  # top-k children at every temperature

    def __call__(
        self,
        drafter: Drafter,
        params,
        state: DraftState,
        ctx: Context,
        key: PRNGKeyArray,
        sampling: SamplingConfig,
    ) -> tuple[Tree, DraftState]:
        """Build the tree from `ctx.root` (deterministic: `key` is unused)."""
        del key
        k, m = self.topk, self.per_call
        logits, state = drafter.begin(params, state, ctx)
        pool = init_pool(ctx.root, logits, sampling, self.capacity, self.window, self.max_depth, k)

        def round_(t, carry):
            pool, state = carry
            # the best unexpanded candidates (expanded entries, the root included, are masked)
            _, best = jax.lax.top_k(jnp.where(pool.slot < 0, pool.score, -jnp.inf), m)
            return expand_entries(
                drafter, params, state, ctx, pool, best, 1 + t * m, 1 + k + t * m * k, sampling, k
            )

        # a loop, not unrolled: rounds can be ~num_nodes, and the drafter is traced once
        pool, state = jax.lax.fori_loop(0, self.rounds, round_, (pool, state))
        return finalize(pool, self.num_nodes, self.max_depth), state

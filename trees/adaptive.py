"""Adaptive draft lengths (SpecDec++): stop drafting a row once its drafts are probably rejected.

`AdaptiveTree(inner, threshold, min_length)` wraps a chain (`chain:K`, `chain:K,sample`) or an
EAGLE-2 dynamic tree (`dynamic:depth=D,topk=k,n=N`) and drafts it depth by depth in a
`lax.while_loop` that ends as soon as every row has stopped, so a row that stops early saves the
drafter's forwards, and the loop verifies the tree in the smallest of a few compiled block
widths that holds every running row's nodes (`widths`; `specdec.decode`).

The stop rule. Each drafted node carries its path's predicted survival S = Π â over the
acceptance estimates known when it was drafted; a node is kept iff its depth <= `min_length` or
S >= 1 - h, i.e. drafting stops once 1 - Π â > h (SpecDec++'s threshold policy; a larger h
drafts longer). The estimates â come from the drafter's `acceptance` member when it has one
(`specdec.drafter`: a trained acceptance head, or n-gram lookup's acceptance history), and the
node's own estimate only exists once the node has been consumed by `expand` — the one-token lag
of SpecDec++: node d + 1's survival is Π_{j <= d} â_j, computed by the same `expand` that drafts
it, so a node that the rule rejects costs a drafter call but no verification slot (on a CPU the
slot is dearer). Without an `acceptance` member the estimate is the draft's own confidence:
q(token) for a deterministic (top-k) draft, included for the node itself, or E_q[q] = Σ q² for a
token sampled from q at temperature > 0 — never the probability of the sampled token itself,
whose selection would bias the drafts away from q and make speculative sampling lossy.

Lossless: the kept tree is a function of draft-side information (the drafter's state, its
tokens, the committed history); the target's draws of this step never enter it, which is all
the verifiers need (`specdec.builder`). Dynamic trees: a candidate whose survival falls below
1 - h is dropped (never expanded, never verified), so the tree stops growing at a depth where no
path survives; the best `n - 1` surviving candidates are kept and moved to the front.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from specdec import drafter as drafter_contract
from specdec.context import Context
from specdec.drafter import Drafter, DraftState
from specdec.sampling import SamplingConfig, probabilities
from specdec.tree import Tree, compact
from specdec.trees.dynamic import DynamicTree
from specdec.trees.pool import expand_entries, finalize, init_pool
from specdec.trees.static import StaticTree
from specdec.trees.topk import add_nodes, record_probs, select_children, take_rows, zero_probs

DEFAULT_THRESHOLD = 0.5  # h when neither the tree spec nor the drafter names one


def default_widths(num_nodes: int) -> tuple[int, ...]:
    """Verification block widths compiled for a tree of `num_nodes` slots: powers of two from 2,
    then `num_nodes` (a power within 25% of it is dropped: its branch would rarely pay)."""
    powers = [w for w in (2, 4, 8, 16, 32, 64) if w < num_nodes and 1.25 * w < num_nodes]
    return tuple(powers) + (num_nodes,)


def stop_depths(estimates, threshold: float, min_length: int, max_length: int) -> list[int]:
    """The chain length the stop rule gives each row (host reference, for tests and docs).

    `estimates[b][j]` is â of draft j + 1 (the estimate of node j + 1, known once it is drafted
    and consumed); node d + 1 is drafted iff d + 1 <= min_length or Π_{j <= d} â_j >= 1 - h,
    and never past `max_length`."""
    out = []
    for row in estimates:
        d, surv = 1, 1.0
        while d < max_length:
            surv *= row[d - 1]
            if d + 1 > min_length and surv < 1 - threshold:
                break
            d += 1
        out.append(d)
    return out


def _is_chain(tree) -> bool:
    return isinstance(tree, StaticTree) and tree.num_nodes == tree.max_depth + 1


@dataclasses.dataclass(frozen=True)
class AdaptiveTree:
    """`inner` (a chain or a `DynamicTree`) drafted with SpecDec++'s stop rule (module doc).

    `threshold` = h in (0, 1) (None: the drafter's measured one, `Drafter.threshold(sampling)`,
    else `DEFAULT_THRESHOLD`); `min_length` depths are always drafted (SpecDec++'s lower bound;
    the upper bound is the inner tree's depth).
    """

    inner: Any
    threshold: float | None = None
    min_length: int = 1

    def __post_init__(self):
        if not (_is_chain(self.inner) or isinstance(self.inner, DynamicTree)):
            spec = getattr(self.inner, "spec", type(self.inner).__name__)
            raise ValueError(f"adaptive lengths apply to chain:K and dynamic:... trees, not {spec}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"the adaptive threshold h must be in (0, 1), got {self.threshold}")
        if not 1 <= self.min_length <= self.inner.max_depth:
            raise ValueError(
                f"min must be in [1, {self.inner.max_depth}] (the tree's depth), got {self.min_length}"
            )

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
    def widths(self) -> tuple[int, ...]:
        return default_widths(self.num_nodes)

    @property
    def spec(self) -> str:
        opts = ([f"h={self.threshold:g}"] if self.threshold is not None else []) + (
            [f"min={self.min_length}"] if self.min_length != 1 else []
        )
        return f"{self.inner.spec}+adaptive" + (":" + ",".join(opts) if opts else "")

    def sibling_mode(self, sampling: SamplingConfig) -> str:
        return self.inner.sibling_mode(sampling)

    def resolved_threshold(self, drafter: Drafter, sampling: SamplingConfig) -> float:
        """h: the spec's, else the drafter's measured one at this temperature, else the default."""
        if self.threshold is not None:
            return self.threshold
        measured = drafter_contract.option(drafter, "threshold")
        h = None if measured is None else measured(sampling)
        return DEFAULT_THRESHOLD if h is None else float(h)

    def __call__(
        self, drafter: Drafter, params, state: DraftState, ctx: Context, key: PRNGKeyArray,
        sampling: SamplingConfig,
    ) -> tuple[Tree, DraftState]:  # fmt: skip
        floor = math.log(1.0 - self.resolved_threshold(drafter, sampling))
        accept = drafter_contract.option(drafter, "acceptance")
        build = self._chain if _is_chain(self.inner) else self._dynamic
        return build(drafter, params, state, ctx, key, sampling, floor, accept)

    def _chain(self, drafter, params, state, ctx, key, sampling, floor, accept):
        k_max, n = self.max_depth, self.num_nodes
        sample = self.inner.sample and not sampling.greedy
        b = ctx.root.shape[0]
        tree = Tree.empty(ctx.root, n, k_max, sibling_mode=self.sibling_mode(sampling))
        logits, state = drafter.begin(params, state, ctx)
        probs = zero_probs(b, n, logits.shape[-1])
        score = jnp.zeros((b, n), jnp.float32)

        def draft(d, tree, probs, score, surv, alive, logits, a_parent):
            """Node d (depth d) drafts node d + 1 from `logits`; returns the updated carry."""
            frontier = jnp.full((b, 1), d, jnp.int32)
            probs = record_probs(probs, frontier, logits[:, None], sampling)
            toks, logq, _, ok = select_children(jax.random.fold_in(key, d), logits[:, None], sampling, 1,
                                                self.inner.sample)  # fmt: skip
            own = _own_estimate(logits, logq[:, 0, 0], sampling, sample, accept)
            surv = surv + jnp.log(a_parent) + own
            keep = alive & ok[:, 0, 0] & ((d + 1 <= self.min_length) | (surv >= floor))
            tree = add_nodes(tree, frontier + 1, toks[:, 0], frontier, keep[:, None])
            score = score.at[:, d + 1].set(score[:, d] + logq[:, 0, 0])
            return tree, probs, score, surv, keep

        ones = jnp.ones((b,), jnp.float32)
        # finished rows draft nothing
        carry = draft(0, tree, probs, score, jnp.zeros((b,), jnp.float32), ctx.running_rows, logits, ones)

        def cond(c):
            d, _, _, _, _, alive, _ = c
            return (d < k_max) & jnp.any(alive)

        def body(c):
            d, tree, probs, score, surv, alive, state = c
            frontier = jnp.full((b, 1), d, jnp.int32)
            logits, state = drafter.expand(params, state, ctx, tree, frontier)
            # the tree carries the path scores drafted so far: a drafter reads q(token) from them
            a = ones if accept is None else accept(params, state, ctx, tree.replace(score=score), frontier,
                                                   sampling)[:, 0]  # fmt: skip
            return (d + 1, *draft(d, tree, probs, score, surv, alive, logits[:, 0], a), state)

        d, tree, probs, score, _, _, state = jax.lax.while_loop(cond, body, (1, *carry, state))
        tree = tree.replace(draft_probs=probs, score=jnp.where(tree.valid, score, -jnp.inf), draft_calls=d)
        return tree, state

    def _dynamic(self, drafter, params, state, ctx, key, sampling, floor, accept):
        del key  # top-k children: deterministic
        inner: DynamicTree = self.inner
        k, depth, b = inner.topk, inner.depth, ctx.root.shape[0]
        logits, state = drafter.begin(params, state, ctx)
        pool = init_pool(ctx.root, logits, sampling, 1 + inner.candidates, inner.window, depth, k)
        # Survival (log) per pool entry: the draft confidence is the pool's own score; a drafter's
        # acceptance estimates accumulate apart (a node's own estimate lags: it joins its children).
        surv = pool.score if accept is None else jnp.where(jnp.isfinite(pool.score), 0.0, -jnp.inf)
        running = ctx.running_rows  # finished rows: depth 1 only

        def cond(c):
            r, _, _, _, alive = c
            return (r <= depth) & alive

        def body(c):
            r, pool, surv, state, _ = c
            prev = jnp.where(r == 2, 1, 1 + k + (r - 3) * k * k)  # the previous round's entry block
            block = jax.lax.dynamic_slice_in_dim(pool.score, prev, k * k, axis=1)  # (round 2: k + empties)
            _, best = jax.lax.top_k(block, k)
            entries = best + prev
            slot0, base = 1 + (r - 2) * k, 1 + k + (r - 2) * k * k
            pool, state = expand_entries(drafter, params, state, ctx, pool, entries, slot0, base, sampling, k)
            child = jax.lax.dynamic_slice_in_dim(pool.score, base, k * k, axis=1)
            if accept is None:
                child_surv = child
            else:
                slots = jnp.broadcast_to(slot0 + jnp.arange(k, dtype=jnp.int32), entries.shape)
                rows = jnp.arange(b)[:, None]
                wslot = jnp.where(pool.slot >= 0, pool.slot, pool.wtree.num_nodes)  # unexpanded: dropped
                wscore = (
                    jnp.zeros(pool.wtree.tokens.shape, jnp.float32)
                    .at[rows, wslot]
                    .set(pool.score, mode="drop")
                )
                a = accept(params, state, ctx, pool.wtree.replace(score=wscore), slots, sampling)  # [B, k]
                par = take_rows(surv, entries) + jnp.log(a)
                child_surv = jnp.repeat(par, k, axis=1) + jnp.where(jnp.isfinite(child), 0.0, -jnp.inf)
            keep = jnp.isfinite(child) & ((r <= self.min_length) | (child_surv >= floor)) & running[:, None]
            child = jnp.where(keep, child, -jnp.inf)
            pool = pool.replace(score=jax.lax.dynamic_update_slice_in_dim(pool.score, child, base, axis=1))
            surv = jax.lax.dynamic_update_slice_in_dim(
                surv, jnp.where(keep, child_surv, -jnp.inf), base, axis=1
            )
            return r + 1, pool, surv, state, jnp.any(keep)

        # Round-1 children (depth 1 <= min_length) are always kept.
        r, pool, _, state, _ = jax.lax.while_loop(cond, body, (2, pool, surv, state, jnp.bool_(True)))
        tree = compact(finalize(pool, inner.num_nodes, depth))
        return tree.replace(draft_calls=r - 1), state


def _own_estimate(
    logits: Float[Array, "B V"], logq: Float[Array, " B"], sampling: SamplingConfig, sample: bool, accept
) -> Float[Array, " B"]:
    """log of a drafted node's own factor in its survival (module doc): 0 with an acceptance
    estimate (it lags), log q(token) for a deterministic draft, log Σ q² for a sampled one."""
    if accept is not None:
        return jnp.zeros_like(logq)
    if sample:
        q = probabilities(logits, sampling)
        return jnp.log(jnp.sum(q * q, axis=-1))
    return logq


def chain_lengths(tree: Tree) -> Int[Array, " B"]:
    """Drafted nodes per row (valid nodes past the root): what the stop rule left."""
    return jnp.sum(tree.valid, axis=1) - 1

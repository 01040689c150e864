"""Recursive Speculative Decoding trees (Jeon et al. 2024; reference notes A3): RSD-C and RSD-S.

Both draw siblings without replacement, so they pair with recursive rejection sampling without
replacement (notes B3.2): at each node the children, in index order, are the sequential draws of
sampling without replacement from `draft_probs` at that node. At temperature 0 both degrade to
deterministic top-k (sibling_mode "deterministic").
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from specdec.context import Context
from specdec.drafter import Drafter, DraftState
from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.trees.static import StaticTree
from specdec.trees.topk import (
    add_nodes,
    record_probs,
    select_children,
    split_keys,
    take_rows,
    zero_probs,
)
from specdec.trees.topk import sibling_mode as draw_mode


@dataclasses.dataclass(frozen=True)
class RSDTree:
    """RSD-C: every node at depth d-1 draws `branching[d-1]` children by Gumbel-top-k.

    The shape is fixed (`1 + b1 + b1*b2 + ...` nodes), so this is a `StaticTree` over the full
    product of ranks with `sample=True`; children keep the Gumbel-key order (the sampling order).
    """

    branching: tuple[int, ...]

    def __post_init__(self):
        b = tuple(self.branching)
        if not b or any(not isinstance(x, int) or x < 1 for x in b):
            raise ValueError(f"branching must be a non-empty tuple of ints >= 1, got {self.branching!r}")
        object.__setattr__(self, "branching", b)
        paths = [p for d in range(1, len(b) + 1) for p in itertools.product(*(range(x) for x in b[:d]))]
        object.__setattr__(self, "_static", StaticTree(tuple(paths), sample=True))

    @property
    def static(self) -> StaticTree:
        """The equivalent `StaticTree` (its host arrays give the node layout)."""
        return self._static

    @property
    def num_nodes(self) -> int:
        return self._static.num_nodes

    @property
    def max_depth(self) -> int:
        return len(self.branching)

    @property
    def window(self) -> int:
        return self._static.window

    @property
    def spec(self) -> str:
        return "rsd:" + ",".join(map(str, self.branching))

    def sibling_mode(self, sampling: SamplingConfig) -> str:
        return draw_mode(True, sampling)

    def __call__(
        self,
        drafter: Drafter,
        params,
        state: DraftState,
        ctx: Context,
        key: PRNGKeyArray,
        sampling: SamplingConfig,
    ) -> tuple[Tree, DraftState]:
        """Draft the product tree from `ctx.root`; `key` drives the Gumbel noise (fresh per depth)."""
        return self._static(drafter, params, state, ctx, key, sampling)


def _child_perturbed_scores(
    parent: Float[Array, "B F 1"], g: Float[Array, "B F W"], z: Float[Array, "B F 1"]
) -> Float[Array, "B F W"]:
    """Kool et al. (2019) stochastic beam search: a child's perturbed score given its parent's.

    G~_c = -log(exp(-G~_p) - exp(-Z) + exp(-G_c)), with G_c ~ Gumbel(log q(path + c)) and Z the
    max of G over all the parent's children, in the stable form G~_p - softplus(v),
    v = G~_p - G_c + log(1 - exp(G_c - Z)). The best child inherits G~_p exactly.
    """
    a = jnp.minimum(g - z, 0.0)
    log1mexp = jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))
    out = parent - jax.nn.softplus(parent - g + log1mexp)
    out = jnp.where(jnp.isfinite(g) & jnp.isfinite(parent), out, -jnp.inf)
    # G~ is non-increasing in rank mathematically; enforce it against rounding so that a parent's
    # kept children are always its first draws (ties go to the lower rank in top_k).
    return jax.lax.cummin(out, axis=out.ndim - 1)


@dataclasses.dataclass(frozen=True)
class RSDBeamTree:
    """RSD-S: stochastic beam search (Kool et al. 2019) with beam width `beam` for `depth` levels.

    Depth 1 is the root's Gumbel-top-`beam` children. At each later depth every beam node draws
    its Gumbel-top-`beam` children; the children's perturbed path scores G~ (see
    `_child_perturbed_scores`) pick the global top-`beam`, which become the next beam. The tree
    keeps every beam node of every depth: `num_nodes = 1 + depth * beam`, depth d at slots
    `1 + (d-1)*beam ...`, sorted by G~ (descending).

    Why it is verifiable per node: G~ is increasing in the child's Gumbel key, so a node's kept
    children are its first m draws in sampling order, and index order (by G~) is that order. The
    count m depends on Gumbel *values*, but in the exponential-race view the j-th draw's identity
    is independent of its arrival time given the earlier draws, so given the history and that
    child j exists it is still distributed as q without the earlier siblings: recursive rejection
    sampling without replacement stays lossless. At temperature 0: deterministic beam search by
    cumulative log-prob.
    """

    depth: int = 4
    beam: int = 3

    def __post_init__(self):
        for name in ("depth", "beam"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    @property
    def num_nodes(self) -> int:
        return 1 + self.depth * self.beam

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def window(self) -> int:
        return self.num_nodes

    @property
    def spec(self) -> str:
        return f"rsd-beam:depth={self.depth},beam={self.beam}"

    def sibling_mode(self, sampling: SamplingConfig) -> str:
        return draw_mode(True, sampling)

    def __call__(
        self,
        drafter: Drafter,
        params,
        state: DraftState,
        ctx: Context,
        key: PRNGKeyArray,
        sampling: SamplingConfig,
    ) -> tuple[Tree, DraftState]:
        """Run the beam from `ctx.root`; `key` drives the Gumbel noise (fresh per depth)."""
        w = self.beam
        root = ctx.root
        b = root.shape[0]
        tree = Tree.empty(root, self.num_nodes, self.depth, sibling_mode=self.sibling_mode(sampling))
        logits, state = drafter.begin(params, state, ctx)
        logits = logits[:, None]
        probs = zero_probs(b, self.num_nodes, logits.shape[-1])
        frontier = jnp.zeros((b, 1), jnp.int32)
        pert = jnp.zeros((b, 1), jnp.float32)  # G~ of each beam node (root: log 1 = 0)
        cum = jnp.zeros((b, 1), jnp.float32)  # log q of each beam node's path
        for d, k in zip(range(1, self.depth + 1), split_keys(key, self.depth), strict=True):
            if d > 1:
                logits, state = drafter.expand(params, state, ctx, tree, frontier)
            probs = record_probs(probs, frontier, logits, sampling)
            toks, logq, keys, ok = select_children(k, logits, sampling, w, sample=True)  # [B, F, W]
            child_cum = cum[..., None] + logq
            if sampling.greedy:
                score = child_cum  # deterministic beam search
            else:
                g = cum[..., None] + keys  # G_c ~ Gumbel(log q(path + c)), ordered by rank
                score = _child_perturbed_scores(pert[..., None], g, g[..., :1])
            flat = lambda x: x.reshape(b, -1)  # [B, F, W] -> [B, F*W], parent-major
            best_score, best = jax.lax.top_k(flat(jnp.where(ok, score, -jnp.inf)), w)
            slots = jnp.broadcast_to(1 + (d - 1) * w + jnp.arange(w, dtype=jnp.int32), (b, w))
            tree = add_nodes(
                tree,
                slots,
                take_rows(flat(toks), best),
                take_rows(frontier, best // w),
                take_rows(flat(ok), best),
            )
            frontier, pert, cum = slots, best_score, take_rows(flat(child_cum), best)
        return tree.replace(draft_probs=probs), state

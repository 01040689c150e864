"""Static trees: a fixed list of choice paths (Medusa / EAGLE-1 style), drafted depth by depth.

A choice path is the tuple of child ranks from the root: `(i,)` is the root's rank-i child,
`(i, j)` the rank-j child of `(i,)`, and so on. The shape is tensorized on the host once, at
construction: paths sorted by (length, path) give node indices 1..n (node 0 is the root), so
parents precede children and siblings are contiguous in rank order (Medusa's
`generate_medusa_buffers` ordering; see reference notes A1.1).

Drafting: `begin` gives the root's logits, then one `expand` per depth on the frontier = the
nodes of the previous depth that have children (a static set, so every shape is static). The
rank-r child of a node is the r-th token of its draft distribution by rank (sibling_mode
"deterministic"), or with `sample=True` at temperature > 0 the r-th token of a Gumbel-top-k draw,
i.e. sampling without replacement in index order (sibling_mode "without_replacement").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from specdec.context import Context
from specdec.drafter import Drafter, DraftState
from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.trees.topk import add_nodes, record_probs, select_children, split_keys, zero_probs
from specdec.trees.topk import sibling_mode as draw_mode

Choices = tuple[tuple[int, ...], ...]

# FasterDecoding/Medusa:medusa/model/medusa_choices.py `mc_sim_7b_63` (the default fallback tree):
# 63 paths (64 nodes with the root), widths per depth [10, 28, 23, 2], 42 leaves. Order as shipped.
MEDUSA_63: Choices = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0),
    (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0),
    (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5),
    (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9),
    (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0),
    (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)  # fmt: skip

# SafeAILab/EAGLE@v1:eagle/model/choices.py (also named `mc_sim_7b_63`, but 25 paths = 26 nodes,
# depth 5, 15 leaves). Children are the draft's top-k conditioned on the parent (unlike Medusa).
EAGLE1_25: Choices = (
    (0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
)  # fmt: skip

# A tree for Falcon's k = 2 semi-autoregressive passes (drafters/falcon.py): the pass anchored at a
# node of even depth drafts two depths at once, and the second depth's distribution is the same for
# every sibling of the first, so branching pays at the first depth of each pass (1, 3, 5) and the
# second depth follows the best sibling. 30 nodes, depth 6, 3 passes. Falcon's own trees
# (Bestpay-inc/Falcon models/choices.py, e.g. 166 nodes with 20 depth-1 children) are sized for GPUs.
FALCON_K2_30: Choices = (
    (0,), (1,), (2,), (3,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 2),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (1, 0, 0), (1, 0, 1),
    (0, 0, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 1, 0, 0), (1, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 1, 0, 0), (0, 0, 0, 1, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 1, 0), (0, 0, 0, 0, 0, 1), (0, 0, 1, 0, 0, 0),
)  # fmt: skip

NAMED_CHOICES: dict[str, Choices] = {"medusa63": MEDUSA_63, "eagle1": EAGLE1_25, "falcon": FALCON_K2_30}


def normalize_choices(choices: Iterable[Iterable[int]]) -> Choices:
    """Validate choice paths and sort them by (depth, path); raises ValueError on a bad list.

    Valid: non-empty paths of non-negative ints, no duplicates, every proper prefix present.
    """
    paths = [tuple(int(r) for r in c) for c in choices]
    if not paths:
        raise ValueError("a static tree needs at least one choice path")
    seen = set(paths)
    if len(seen) != len(paths):
        raise ValueError("duplicate choice paths")
    for p in paths:
        if not p or min(p) < 0:
            raise ValueError(f"choice paths must be non-empty tuples of ranks >= 0, got {p}")
        if len(p) > 1 and p[:-1] not in seen:
            raise ValueError(f"choice path {p} lacks its parent {p[:-1]}")
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


@dataclasses.dataclass(frozen=True)
class _Level:
    """Host-side plan of one drafting round (children at depth d from frontier at depth d-1)."""

    frontier: np.ndarray  # [F] node indices expanded this round
    child: np.ndarray  # [C] node indices filled this round
    child_f: np.ndarray  # [C] position of each child's parent in `frontier`
    child_rank: np.ndarray  # [C] rank of each child among its parent's drafts
    k: int  # children drafted per frontier node (max rank + 1)


def tensorize(choices: Choices) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[_Level, ...]]:
    """(parents[N], depth[N], rank[N], levels) for normalized choices; node 0 is the root."""
    index = {(): 0} | {p: i + 1 for i, p in enumerate(choices)}
    n = len(choices) + 1
    parents = np.full(n, -1, np.int32)
    depth = np.zeros(n, np.int32)
    rank = np.zeros(n, np.int32)
    for p, i in index.items():
        if p:
            parents[i], depth[i], rank[i] = index[p[:-1]], len(p), p[-1]
    levels = []
    for d in range(1, int(depth.max()) + 1):
        child = np.nonzero(depth == d)[0]
        frontier = np.unique(parents[child])
        child_f = np.searchsorted(frontier, parents[child])
        k = int(rank[child].max()) + 1
        levels.append(_Level(frontier, child, child_f.astype(np.int32), rank[child], k))
    return parents, depth, rank, tuple(levels)


@dataclasses.dataclass(frozen=True)
class StaticTree:
    """A fixed tree of choice paths; `sample=True` draws siblings by Gumbel-top-k at T > 0.

    `num_nodes = len(choices) + 1`, `max_depth = longest path`, `window = num_nodes`. With
    `sample=True` siblings must have contiguous ranks 0..k-1: sampling without replacement is
    only verifiable if every earlier draw of a node is in the tree.
    """

    choices: Choices
    sample: bool = False

    def __post_init__(self):
        choices = normalize_choices(self.choices)
        object.__setattr__(self, "choices", choices)
        if self.sample:
            have = set(choices)
            for p in choices:
                if any(p[:-1] + (r,) not in have for r in range(p[-1])):
                    raise ValueError(f"sample=True needs contiguous sibling ranks; {p} has a gap before it")
        object.__setattr__(self, "_layout", tensorize(choices))

    @property
    def num_nodes(self) -> int:
        return len(self.choices) + 1

    @property
    def max_depth(self) -> int:
        return len(self.choices[-1])

    @property
    def window(self) -> int:
        return self.num_nodes

    def sibling_mode(self, sampling: SamplingConfig) -> str:
        return draw_mode(self.sample, sampling)

    @property
    def parents(self) -> np.ndarray:
        """[N] parent index per node (host, -1 at the root)."""
        return self._layout[0]

    @property
    def depth(self) -> np.ndarray:
        """[N] depth per node (host)."""
        return self._layout[1]

    @property
    def rank(self) -> np.ndarray:
        """[N] rank of each node among its siblings' drafts (host; 0 at the root)."""
        return self._layout[2]

    @property
    def spec(self) -> str:
        """The CLI string `parse_tree` turns back into this builder."""
        suffix = ",sample" if self.sample else ""
        if self.choices == tuple((0,) * d for d in range(1, self.num_nodes)):
            return f"chain:{self.num_nodes - 1}{suffix}"
        for name, c in NAMED_CHOICES.items():
            if normalize_choices(c) == self.choices:
                return f"static:{name}{suffix}"
        return f"static:{list(self.choices)}{suffix}".replace(" ", "")

    def __call__(
        self,
        drafter: Drafter,
        params,
        state: DraftState,
        ctx: Context,
        key: PRNGKeyArray,
        sampling: SamplingConfig,
    ) -> tuple[Tree, DraftState]:
        """Draft the fixed shape from `ctx.root`; returns a Tree [B, num_nodes] and the new state."""
        root = ctx.root
        b = root.shape[0]
        tree = Tree.empty(root, self.num_nodes, self.max_depth, sibling_mode=self.sibling_mode(sampling))
        logits, state = drafter.begin(params, state, ctx)
        logits = logits[:, None]  # [B, 1, V]: the first frontier is the root alone
        probs = zero_probs(b, self.num_nodes, logits.shape[-1])
        score = jnp.zeros((b, self.num_nodes), jnp.float32)  # cumulative draft log-prob of each path
        levels = self._layout[3]
        for lvl, k in zip(levels, split_keys(key, len(levels)), strict=True):
            frontier = jnp.broadcast_to(jnp.asarray(lvl.frontier, jnp.int32), (b, len(lvl.frontier)))
            if lvl is not levels[0]:
                logits, state = drafter.expand(params, state, ctx, tree, frontier)
            probs = record_probs(probs, frontier, logits, sampling)
            toks, logq, _, ok = select_children(k, logits, sampling, lvl.k, self.sample)  # [B, F, k]
            child = jnp.asarray(lvl.child, jnp.int32)
            par_score = score[:, lvl.frontier[lvl.child_f]]
            score = score.at[:, child].set(par_score + logq[:, lvl.child_f, lvl.child_rank])
            tree = add_nodes(
                tree,
                slots=jnp.broadcast_to(jnp.asarray(lvl.child, jnp.int32), (b, len(lvl.child))),
                tokens=toks[:, lvl.child_f, lvl.child_rank],
                parents=frontier[:, lvl.child_f],
                ok=ok[:, lvl.child_f, lvl.child_rank],
            )
        return tree.replace(draft_probs=probs, score=jnp.where(tree.valid, score, -jnp.inf)), state


def chain(k: int, sample: bool = False) -> StaticTree:
    """A chain of k drafted tokens (k + 1 nodes): each node's rank-0 child."""
    if k < 1:
        raise ValueError(f"a chain needs k >= 1 drafted tokens, got {k}")
    return StaticTree(tuple((0,) * d for d in range(1, k + 1)), sample=sample)

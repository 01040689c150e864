"""The tree-builder contract.

A builder is a frozen dataclass (a jit static argument) with a static node budget, called as

    tree, draft_state = builder(drafter, params, draft_state, ctx, key, sampling)

It drafts from `ctx.root` by calling `drafter.begin` once and `drafter.expand` on frontiers, and
returns a `Tree` of exactly `num_nodes` slots (root included; unused slots invalid) whose depth
is at most `max_depth`, satisfying `specdec.trees.check_tree`. It records what the verifier needs:
`draft_probs` (the processed draft distribution each node's children were drawn from) and
`sibling_mode`. Drafting randomness comes only from `key`, never from the target (the tree shape
must not depend on target samples). At temperature 0 drafts are deterministic (top-k by draft
probability).

`window` is the number of node slots a drafter may write while building (>= num_nodes; larger
when the builder drafts candidates it later drops, as EAGLE-2 does): drafters size their per-node
state from it and caches keep that headroom.

Optional members (`OPTIONAL`, read through `option`): a builder that lacks one gets its default.

    budget: int | None = None        M: the loop keeps the batch's M best drafted nodes over all
                                     rows and verifies only those (`specdec.budget`).
    sibling_mode(sampling) -> str    how the tree's children are drawn under `sampling`
                                     (`specdec.tree.SIBLING_MODES`); lets a verifier that cannot
                                     take that mode be refused before compiling. Without it the
                                     verifier checks the traced tree.
    spec: str                        the CLI string that builds it (`specdec.trees.parse_tree`).
    widths: tuple[int, ...] | None   verification block widths to compile, ascending, the last =
                                     num_nodes: the loop verifies each step in the smallest width
                                     that holds every running row's valid nodes (so the builder
                                     keeps valid nodes in front: `specdec.tree.compact`). None = the
                                     whole tree every step. Adaptive lengths declare them.
    fuses: tuple[int, int] | None    (R, L): the builder merges a fused drafter's R retrieval paths
                                     of up to L tokens into its tree (`specdec.trees.fused`); it
                                     drafts only with a drafter whose `fused` is the same pair.
    model_depth: int | None          the depth the drafter itself is asked to draft when it is less
                                     than `max_depth` (a fused tree's retrieval paths go deeper);
                                     None = max_depth.
"""

from __future__ import annotations

from typing import Any, Protocol

from jaxtyping import PRNGKeyArray

from specdec.context import Context
from specdec.drafter import Drafter, DraftState
from specdec.sampling import SamplingConfig
from specdec.tree import Tree

REQUIRED = ("num_nodes", "max_depth", "window")
OPTIONAL: dict[str, Any] = {
    "budget": None, "sibling_mode": None, "spec": None, "widths": None, "fuses": None, "model_depth": None,
}  # fmt: skip


class TreeBuilder(Protocol):
    num_nodes: int
    max_depth: int
    window: int

    def __call__(
        self,
        drafter: Drafter,
        params,
        state: DraftState,
        ctx: Context,
        key: PRNGKeyArray,
        sampling: SamplingConfig,
    ) -> tuple[Tree, DraftState]: ...


def option(builder, name: str):
    """The builder's optional member `name` (see `OPTIONAL`), or its default."""
    return getattr(builder, name, OPTIONAL[name])


def missing(builder) -> list[str]:
    """The contract members `builder` lacks (empty when it fits)."""
    out = [m for m in REQUIRED if not hasattr(builder, m)]
    return out + ([] if callable(builder) else ["__call__"])

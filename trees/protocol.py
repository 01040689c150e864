"""The tree-builder protocol.

A builder is a frozen dataclass (a jit static argument) with a static node budget, called as

    tree, draft_state = builder(drafter, params, draft_state, ctx, key, sampling)

It drafts from `ctx.root` by calling `drafter.begin` once and `drafter.expand` on frontiers, and
returns a `Tree` of exactly `num_nodes` slots (root included; unused slots invalid) whose depth
is at most `max_depth`. It records what the verifier needs: `draft_probs` (the processed draft
distribution each node's children were drawn from) and `sibling_mode`. Drafting randomness comes
only from `key`, never from the target (the tree shape must not depend on target samples).
At temperature 0 drafts are deterministic (top-k by draft probability).

`window` is the number of node slots a drafter may write while building (>= num_nodes; larger
when the builder drafts candidates it later drops, as EAGLE-2 does); caches keep that headroom.
"""

from __future__ import annotations

from typing import Protocol

from jaxtyping import PRNGKeyArray

from specdec.drafters.protocol import Context, Drafter, DraftState
from specdec.sampling import SamplingConfig
from specdec.tree import Tree


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

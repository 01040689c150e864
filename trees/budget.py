"""`BatchBudget`: every row drafts its tree, the batch verifies at most `tokens` drafts.

`BatchBudget(inner, tokens)` wraps any builder and declares `budget = tokens`; the decode loop then
keeps the batch's `tokens` most useful drafted nodes over all rows (plus every root) and runs the
target forward on those alone. Which nodes are kept, and why it stays lossless, is
`specdec.budget`'s (the pruning lives in the core loop, which knows which rows lag or are done).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtyping import PRNGKeyArray

from specdec.budget import lag_priority, prune
from specdec.builder import option as builder_option
from specdec.context import Context
from specdec.drafter import Drafter, DraftState
from specdec.sampling import SamplingConfig
from specdec.tree import Tree

__all__ = ["BatchBudget", "lag_priority", "prune"]


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

    @property
    def fuses(self):
        return builder_option(self.inner, "fuses")

    @property
    def model_depth(self):
        return builder_option(self.inner, "model_depth")

    def sibling_mode(self, sampling: SamplingConfig) -> str | None:
        inner = builder_option(self.inner, "sibling_mode")
        return None if inner is None else inner(sampling)

    def __call__(
        self, drafter: Drafter, params, state: DraftState, ctx: Context, key: PRNGKeyArray,
        sampling: SamplingConfig,
    ) -> tuple[Tree, DraftState]:  # fmt: skip
        # The whole tree per row: the decode loop prunes it (`prune`), since it knows which rows
        # are done and which lag (the priority of `lag_priority`).
        return self.inner(drafter, params, state, ctx, key, sampling)

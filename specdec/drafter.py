"""The drafter contract: what a tree builder calls to draft, and what the loop feeds back.

A drafter is a frozen dataclass (static, hashable: a jit static argument) holding its
configuration, plus pure methods over its params and a state pytree. The decode loop calls:

    state = d.init(params, ctx, prompt, prefill_taps, cache_size, window=W)  # after the prefill
    per step:
      logits, state = d.begin(params, state, ctx)                   # next token after the root
      logits, state = d.expand(params, state, ctx, tree, frontier)  # next token after frontier nodes
      ... (the builder calls begin once, then expand as often as its shape needs)
      state = d.update(params, state, ctx, tree, verdict, taps)     # after verification + commit

`ctx` is the committed history (`Context`); `prompt` the right-padded prompt block the target
prefilled (row b's prompt is `ctx.lengths[b] - 1` tokens: the root is the first sampled token).
`tree` is the tree under construction: the builder fills node slots in topological order, and
`frontier[b, f]` are indices of filled nodes whose children are wanted next (with static shapes a
frontier slot can be an invalid node, token PAD, when sampling left fewer drawable tokens than the
tree asks for: `expand` must not fail on it, and its logits are ignored). `window` is the number of
node slots the builder may write this step (`TreeBuilder.window`, >= its `num_nodes`): a drafter
that keeps per-node state (features, KV over tree nodes) sizes it from `window` in `init`, never
from a constructor default. A drafter that keeps a KV cache over tree nodes writes node i at its
cache slot `root_slot + i`, where `root_slot = ctx.lengths - 1` (slot index = position for
committed tokens), and reads tree ancestry from `specdec.tree.ancestor_mask`. `taps` are the
target's hidden taps (`Drafter.taps`, HF numbering) at every tree node of the verification forward,
so feature-level drafters (EAGLE, Medusa) can take the accepted nodes' features. `update` sees the
new `ctx` (accepted tokens and the new root appended); a token-level drafter catches up there on
the tokens it has not processed (at most `tree.max_depth + 1`, a static bound), which works for
any builder, including ones that reindex their candidates. Rows that finished (EOS or the token
budget) keep receiving calls with static shapes; their `ctx` no longer grows.

Optional members (`OPTIONAL`, read through `option`): a drafter that lacks one gets its default.

    max_depth: int | None = None   the deepest tree depth the drafter has a distribution of its own
                                   for (Medusa's heads, DFlash's block - 1, n-gram's proposal);
                                   None = any depth. A deeper tree is refused before compiling.
    adaptive: bool = False         True: the loop calls `should_draft(params, state, ctx) -> Bool[B]`
                                   before drafting and, when no running row wants to draft, takes
                                   a plain AR step (a T = 1 forward) instead of a tree block.
    fallback: str | None = None    a sentence naming what the drafter drafts when it has nothing to
                                   propose (n-gram lookup without a match); the loop logs it once.
    acceptance = None              a callable `acceptance(params, state, ctx, tree, nodes, sampling)
                                   -> Float[B, F]`: the predicted probability that each node's token
                                   is accepted given that its parent was (SpecDec++'s acceptance
                                   head for this sampling temperature, or a training-free estimate),
                                   from draft-side information only. Called right after
                                   `expand(..., frontier=nodes)`, so it may read what that call
                                   stored per node (the one-token lag: a node's estimate exists once
                                   the node itself has been consumed). Adaptive-length trees
                                   (`specdec.trees.adaptive`) stop on it; without it they use the
                                   draft's own confidence q(token).
    threshold = None               a callable `threshold(sampling) -> float | None`: the stop
                                   threshold h measured for this drafter's acceptance estimate at
                                   that temperature (stop once 1 - prod(a) > h); None = the
                                   builder's default.
    fused: tuple[int, int] | None  (R, L): the drafter carries retrieval candidates to merge into
                                   its tree (`specdec.drafters.fused.Fused`: a model drafter plus
                                   retrieval sources), returned by `retrieve(params, state, ctx)`
                                   as R paths of up to L tokens. Only a builder that declares the
                                   same `fuses` (`specdec.trees.fused.FusedTree`) may draft with it.

The four families fit as: parallel heads (Medusa, Amphista: `expand` returns head d's logits
for frontier nodes at depth d, from features stored by `update`), feature-level autoregressive
(EAGLE: a decoder layer over [token embedding ; feature] with its own KV over tree nodes),
semi-autoregressive blocks (Falcon: `expand` may precompute k depths at once and serve them from
its state), token-level (a draft model or n-gram lookup over `ctx.tokens`).
"""

from __future__ import annotations

from typing import Any, Protocol

from jaxtyping import Array, Bool, Float, Int

from specdec.context import Context
from specdec.tree import Tree
from specdec.verifiers.protocol import Verdict

DraftState = Any
Taps = tuple[Float[Array, "B N D"], ...]

REQUIRED = ("taps", "vocab_size", "init", "begin", "expand", "update")
OPTIONAL: dict[str, Any] = {
    "max_depth": None, "adaptive": False, "fallback": None, "acceptance": None, "threshold": None,
    "fused": None,
}  # fmt: skip


class Drafter(Protocol):
    taps: tuple[int, ...]  # target hidden taps `update` wants; () for none
    vocab_size: int

    def init(
        self, params, ctx: Context, prompt: Int[Array, "B T"], prefill_taps: Taps, cache_size: int, *,
        window: int,
    ) -> DraftState: ...  # fmt: skip

    def begin(self, params, state: DraftState, ctx: Context) -> tuple[Float[Array, "B V"], DraftState]: ...

    def expand(
        self, params, state: DraftState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]
    ) -> tuple[Float[Array, "B F V"], DraftState]: ...

    def update(
        self, params, state: DraftState, ctx: Context, tree: Tree, verdict: Verdict, taps: Taps
    ) -> DraftState: ...


class AdaptiveDrafter(Drafter, Protocol):
    """A drafter with `adaptive = True` also answers which rows want to draft this step."""

    adaptive: bool

    def should_draft(self, params, state: DraftState, ctx: Context) -> Bool[Array, " B"]: ...


def option(drafter, name: str):
    """The drafter's optional member `name` (see `OPTIONAL`), or its default."""
    return getattr(drafter, name, OPTIONAL[name])


def missing(drafter) -> list[str]:
    """The contract members `drafter` lacks (empty when it fits)."""
    out = [m for m in REQUIRED if not hasattr(drafter, m)]
    if option(drafter, "adaptive") and not callable(getattr(drafter, "should_draft", None)):
        out.append("should_draft (adaptive = True)")
    return out

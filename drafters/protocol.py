"""The drafter protocol: what a tree builder calls to draft, and what the loop feeds back.

A drafter is a frozen dataclass (static, hashable: a jit static argument) holding its
configuration, plus pure methods over its params and a state pytree. The decode loop calls:

    state = d.init(params, ctx, prompt, prefill_taps, cache_size)  # once, after the target's prefill
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
tree asks for: `expand` must not fail on it, and its logits are ignored). A drafter that
keeps a KV cache over tree nodes writes node i at its cache slot `root_slot + i`, where
`root_slot = ctx.lengths - 1` (slot index = position for committed tokens), and reads tree
ancestry from `specdec.tree.ancestor_mask`. `taps` are the target's hidden taps
(`Drafter.taps`, HF numbering) at every tree node of the verification forward, so
feature-level drafters (EAGLE, Medusa) can take the accepted nodes' features.
`update` sees the new `ctx` (accepted tokens and the new root appended); a token-level drafter
catches up there on the tokens it has not processed (at most `tree.max_depth + 1`, a static
bound), which works for any builder, including ones that reindex their candidates.

The four families fit as: parallel heads (Medusa, Amphista: `expand` returns head d's logits
for frontier nodes at depth d, from features stored by `update`), feature-level autoregressive
(EAGLE: a decoder layer over [token embedding ; feature] with its own KV over tree nodes),
semi-autoregressive blocks (Falcon: `expand` may precompute k depths at once and serve them from
its state), token-level (a draft model or n-gram lookup over `ctx.tokens`).
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from specdec.tree import Tree
from specdec.verifiers.protocol import Verdict

DraftState = Any
Taps = tuple[Float[Array, "B N D"], ...]


@flax.struct.dataclass
class Context:
    tokens: Int[Array, "B S"]  # prompt + generated tokens; tokens[b, lengths[b] - 1] is the root
    lengths: Int[Array, " B"]  # committed tokens including the root

    @property
    def root(self) -> Int[Array, " B"]:
        return jnp.take_along_axis(self.tokens, (self.lengths - 1)[:, None], axis=1)[:, 0]


def logits_by_depth(logits: Float[Array, "B K V"], tree: Tree, frontier: Int[Array, "B F"], first: int = 0):
    """The parallel-heads `expand`: frontier node at depth d gets `logits[:, first + d]` (clipped to
    the last one: depths past the heads reuse it). Medusa, Amphista (first = 0: head d drafts depth
    d + 1) and DFlash (first = 1: block position d + 1) serve every builder this way."""
    depth = jnp.take_along_axis(tree.depth, frontier, axis=1)
    pos = jnp.clip(depth + first, first, logits.shape[1] - 1)
    return jnp.take_along_axis(logits, pos[:, :, None], axis=1)


class Drafter(Protocol):
    taps: tuple[int, ...]  # target hidden taps `update` wants; () for none
    vocab_size: int

    def init(
        self, params, ctx: Context, prompt: Int[Array, "B T"], prefill_taps: Taps, cache_size: int
    ) -> DraftState: ...

    def begin(self, params, state: DraftState, ctx: Context) -> tuple[Float[Array, "B V"], DraftState]: ...

    def expand(
        self, params, state: DraftState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]
    ) -> tuple[Float[Array, "B F V"], DraftState]: ...

    def update(
        self, params, state: DraftState, ctx: Context, tree: Tree, verdict: Verdict, taps: Taps
    ) -> DraftState: ...

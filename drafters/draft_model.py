"""Token-level drafters with a KV cache: an independent small draft model, and layer-skip.

`DraftModel` runs any Llama-family model that shares the target's tokenizer. `layer_skip` builds
one from the target itself: its first k layers + its final norm and head, sharing the target's
arrays (no copy) — a real drafter for any target with no training.

Cache discipline (slot index = position for committed tokens): after `init`/`update` the cache
holds every committed token before the root, the root is at slot `lengths` and its next-token
logits are in the state. While a tree is built, node i is written at slot `lengths + i` and
attends to the committed prefix plus its ancestors. `update` then processes the tokens committed
by the step (at most `tree.max_depth + 1`: accepted drafts + the new root) in one block, so no
tree slot needs to survive a step — any builder works, including ones that reindex candidates.

SpecDec++ acceptance heads (`accept_heads`, `specdec.drafters.accept_head`) read the draft model's
final normed state after it consumed the node's token (`node_hidden[b, i]`, kept only with heads).
A layer-skip drafter's heads ship in a heads-only checkpoint (`drafter.json` family "layerskip",
config `{"num_layers": K}`, arrays `accept.*` only; `specdec.drafters.checkpoint`): the layers are
the target's own.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from specdec.cache import KVCache, causal_mask
from specdec.context import Context
from specdec.drafters import accept_head
from specdec.drafters.protocol import parent_confidence
from specdec.models.config import ModelConfig
from specdec.models.llama import Params, forward, lm_head, prefill
from specdec.tree import Tree, ancestor_mask


@flax.struct.dataclass
class DraftModelState:
    cache: KVCache  # lengths[b] = the root's slot
    root_logits: Float[Array, "B V"]
    # the final normed state at each tree node after its token (node 0 = root); None without heads
    node_hidden: Float[Array, "B W D"] | None = None
    # committed token i sits at draft slot i - offset: 0, unless the drafter prefilled a prompt of
    # its own (a RAG drafter's shortened context, `specdec.drafters.rag`)
    offset: Int[Array, " B"] | None = None


@dataclasses.dataclass(frozen=True)
class LayerSkipConfig:
    """A layer-skip drafter as a checkpoint stores it: the target's first `num_layers` layers."""

    num_layers: int


@dataclasses.dataclass(frozen=True)
class DraftModel(accept_head.AcceptanceMembers):
    """A small Llama-family model as drafter. `cfg` describes the draft model; `accept_heads` its
    SpecDec++ heads (set by the checkpoint loader; () = none)."""

    cfg: ModelConfig
    taps: tuple[int, ...] = ()
    accept_heads: tuple[accept_head.HeadSpec, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def _hidden_tap(self) -> tuple[int, ...]:
        """The forward taps the drafter asks for: the final normed state when heads read it."""
        return (self.cfg.num_layers,) if self.accept_heads else ()

    def _accept_input(self, params, state: DraftModelState, tree: Tree, nodes: Int[Array, "B F"]):
        """What a head reads at each node (`accept_head.AcceptanceMembers`): the final normed state
        after the node's token, which `expand` stored."""
        return jnp.take_along_axis(state.node_hidden, nodes[:, :, None], axis=1)

    def _confidence(self, params, state: DraftModelState, tree: Tree, nodes, sampling) -> Float[Array, "B F"]:
        return parent_confidence(lambda h: lm_head(params, h), state.node_hidden, tree, nodes, sampling)

    def _catch_up(
        self, params, cache: KVCache, ctx: Context, block: int, node_hidden=None, offset=None
    ) -> DraftModelState:
        """Run the committed tokens from slot `cache.lengths` to the root (<= block of them);
        `node_hidden` (with heads) gets the root's state at node 0."""
        b = ctx.tokens.shape[0]
        shift = jnp.zeros((b,), jnp.int32) if offset is None else offset
        pos = cache.lengths[:, None] + jnp.arange(block)[None, :]
        at = jnp.minimum(pos + shift[:, None], ctx.tokens.shape[1] - 1)
        toks = jnp.take_along_axis(ctx.tokens, at, axis=1)
        count = ctx.lengths - shift - cache.lengths  # tokens to run, root included (0 for finished rows)
        last = jnp.clip(count - 1, 0, block - 1)[:, None]
        logits, hidden, cache = forward(params, self.cfg, toks, pos, cache, causal_mask(b, block),
                                        taps=self._hidden_tap, logits_idx=last)  # fmt: skip
        cache = cache.advance(jnp.maximum(count - 1, 0))  # the root stays pending at slot lengths
        if node_hidden is not None:  # the root's state: its children's q(y) come from it
            root = jnp.take_along_axis(hidden[0], last[:, :, None], axis=1)[:, 0]
            node_hidden = node_hidden.at[:, 0].set(root.astype(node_hidden.dtype))
        return DraftModelState(cache=cache, root_logits=logits[:, 0], node_hidden=node_hidden, offset=offset)

    def init(
        self, params, ctx: Context, prompt: Int[Array, "B T"], prefill_taps, cache_size: int, *, window: int
    ):
        b = prompt.shape[0]
        _, _, cache = prefill(params, self.cfg, prompt, KVCache.init(self.cfg, b, cache_size))
        cache = cache.advance(ctx.lengths - 1)  # the prompt; the root is the first sampled token
        hidden = jnp.zeros((b, window, self.cfg.hidden_size), jnp.float32) if self.accept_heads else None
        return self._catch_up(params, cache, ctx, 1, hidden)

    def begin(self, params, state: DraftModelState, ctx: Context):
        return state.root_logits, state

    def expand(self, params, state: DraftModelState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]):
        cache = state.cache
        toks = jnp.take_along_axis(jnp.where(tree.valid, tree.tokens, 0), frontier, axis=1)
        depth = jnp.take_along_axis(tree.depth, frontier, axis=1)
        anc = jnp.take_along_axis(ancestor_mask(tree), frontier[:, :, None], axis=1)  # [B, F, N]
        slots = cache.lengths[:, None] + frontier
        logits, hidden, cache = forward(params, self.cfg, toks, cache.lengths[:, None] + depth, cache, anc,
                                        slots=slots, taps=self._hidden_tap)  # fmt: skip
        if state.node_hidden is not None:  # frontier nodes are never the root: node 0 is kept
            rows = jnp.arange(toks.shape[0])[:, None]
            node_hidden = state.node_hidden.at[rows, frontier].set(hidden[0], mode="drop")
            state = state.replace(node_hidden=node_hidden)
        return logits, state.replace(cache=cache)

    def update(self, params, state: DraftModelState, ctx: Context, tree: Tree, verdict, taps):
        # The old root was written at its slot during the step's tree build; keep it.
        cache = state.cache.advance(1)
        return self._catch_up(params, cache, ctx, tree.max_depth + 1, state.node_hidden, state.offset)


def layer_skip(params: Params, cfg: ModelConfig, num_layers: int) -> tuple[DraftModel, Params]:
    """A self-drafter from the target's first `num_layers` layers + final norm + head (shared arrays)."""
    if not 1 <= num_layers < cfg.num_layers:
        raise ValueError(
            f"layer-skip needs 1 <= k < {cfg.num_layers} (the target's layer count), got k={num_layers}"
        )
    if cfg.scan_layers:
        layers = jax.tree.map(lambda v: v[:num_layers], params["layers"])  # PackedWeight tiles too
    else:
        layers = list(params["layers"][:num_layers])
    return DraftModel(cfg.replace(num_layers=num_layers)), {**params, "layers": layers}

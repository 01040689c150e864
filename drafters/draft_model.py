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
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from specdec.cache import KVCache, causal_mask
from specdec.context import Context
from specdec.models.config import ModelConfig
from specdec.models.llama import Params, forward
from specdec.tree import Tree, ancestor_mask


@flax.struct.dataclass
class DraftModelState:
    cache: KVCache  # lengths[b] = the root's slot
    root_logits: Float[Array, "B V"]


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """A small Llama-family model as drafter. `cfg` describes the draft model."""

    cfg: ModelConfig
    taps: tuple[int, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def _catch_up(self, params, cache: KVCache, ctx: Context, block: int) -> DraftModelState:
        """Run the committed tokens from slot `cache.lengths` to the root (<= block of them)."""
        b = ctx.tokens.shape[0]
        pos = cache.lengths[:, None] + jnp.arange(block)[None, :]
        toks = jnp.take_along_axis(ctx.tokens, jnp.minimum(pos, ctx.tokens.shape[1] - 1), axis=1)
        count = ctx.lengths - cache.lengths  # tokens to run, root included (0 for finished rows)
        last = jnp.clip(count - 1, 0, block - 1)[:, None]
        logits, _, cache = forward(params, self.cfg, toks, pos, cache, causal_mask(b, block), logits_idx=last)
        cache = cache.advance(jnp.maximum(count - 1, 0))  # the root stays pending at slot lengths
        return DraftModelState(cache=cache, root_logits=logits[:, 0])

    def init(
        self, params, ctx: Context, prompt: Int[Array, "B T"], prefill_taps, cache_size: int, *, window: int
    ):
        b, t = prompt.shape
        cache = KVCache.init(self.cfg, b, cache_size)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        _, _, cache = forward(params, self.cfg, prompt, pos, cache, causal_mask(b, t))
        cache = cache.advance(ctx.lengths - 1)  # the prompt; the root is the first sampled token
        return self._catch_up(params, cache, ctx, 1)

    def begin(self, params, state: DraftModelState, ctx: Context):
        return state.root_logits, state

    def expand(self, params, state: DraftModelState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]):
        cache = state.cache
        toks = jnp.take_along_axis(jnp.where(tree.valid, tree.tokens, 0), frontier, axis=1)
        depth = jnp.take_along_axis(tree.depth, frontier, axis=1)
        anc = jnp.take_along_axis(ancestor_mask(tree), frontier[:, :, None], axis=1)  # [B, F, N]
        slots = cache.lengths[:, None] + frontier
        logits, _, cache = forward(
            params, self.cfg, toks, cache.lengths[:, None] + depth, cache, anc, slots=slots
        )
        return logits, state.replace(cache=cache)

    def update(self, params, state: DraftModelState, ctx: Context, tree: Tree, verdict, taps):
        # The old root was written at its slot during the step's tree build; keep it.
        cache = state.cache.advance(1)
        return self._catch_up(params, cache, ctx, tree.max_depth + 1)


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

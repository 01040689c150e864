"""KVCache: static-shape key/value cache with per-row lengths, and its ops.

Layout `k, v: [L, B, S, H_kv, Dh]`; `lengths[b]` = number of committed tokens of row b, whose keys
sit contiguously in slots `[0, lengths[b])`. A forward pass writes its new block of T tokens at
slots `[lengths[b], lengths[b] + T)` without moving `lengths`; the caller then decides what to keep:
`advance` (AR step or an accepted chain prefix: no copy) or `commit` (a tree: gather the accepted
path's slots to contiguous ones). Slots past `lengths` are stale and always masked out, so rejecting
tokens is free.

Shared prefixes (Hydragen): `shared` holds zero or more levels of prefix K/V, each one copy per
group of contiguous rows (`SharedSegment`), prefilled once and never written by the loop. A row's
own segment then starts at position `base[b]` (the sum of its groups' shared lengths):
`lengths[b]` still counts every committed token of the row (prefix included; it is the next
token's RoPE position), and its own slot i holds position `base[b] + i`, so `filled = lengths -
base` of its slots are in use. `write`, `advance` and `commit` touch only the row's own segment:
rejections and tree commits never reach a shared prefix. Attention merges the levels and the own
segment by log-sum-exp (`specdec.attention.attend_shared`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

if TYPE_CHECKING:  # the model imports the cache; the cache only needs the config's type
    from specdec.models.config import ModelConfig


@flax.struct.dataclass
class SharedSegment:
    """One level of shared prefix: K/V of G groups (rows `[i B/G, (i+1) B/G)` form group i), slots
    `[0, lengths[g])` of group g filled (positions `[base, base + lengths[g])`, base the levels above)."""

    k: Float[Array, "L G P Hkv Dh"]
    v: Float[Array, "L G P Hkv Dh"]
    lengths: Int[Array, " G"]

    @property
    def groups(self) -> int:
        return self.k.shape[1]

    def per_row(self, x: Array, batch: int) -> Array:
        """A per-group array [G, ...] repeated for each row of a batch of `batch` rows."""
        return jnp.repeat(x, batch // self.groups, axis=0)


@flax.struct.dataclass
class KVCache:
    k: Float[Array, "L B S Hkv Dh"]
    v: Float[Array, "L B S Hkv Dh"]
    lengths: Int[Array, " B"]
    shared: tuple[SharedSegment, ...] = ()  # shared-prefix levels, outermost first

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, size: int, num_layers: int | None = None) -> KVCache:
        """An empty cache of `size` slots per row (`num_layers` defaults to the model's)."""
        shape = (num_layers or cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return cls(k=zeros, v=zeros, lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def size(self) -> int:
        """Slots of each row's own segment."""
        return self.k.shape[2]

    @property
    def base(self) -> Int[Array, " B"]:
        """Position of each row's own slot 0: the tokens its shared-prefix levels hold (0 without)."""
        b = self.lengths.shape[0]
        return sum((seg.per_row(seg.lengths, b) for seg in self.shared), jnp.zeros((b,), jnp.int32))

    @property
    def filled(self) -> Int[Array, " B"]:
        """Own slots holding committed tokens (`lengths` without a shared prefix)."""
        return self.lengths - self.base if self.shared else self.lengths

    def write(
        self,
        layer: int | Int[Array, ""],
        k_new: Float[Array, "B T Hkv Dh"],
        v_new: Float[Array, "B T Hkv Dh"],
        slots: Int[Array, "B T"] | None = None,
    ) -> KVCache:
        """Write a block into one layer at `slots` (default: `[lengths, lengths + T)` per row).

        Explicit slots let a drafter write tree nodes at `lengths + node_index` while expanding only
        part of a tree. Writes beyond the cache are dropped rather than clamped (a clamped write
        would overwrite committed keys); `specdec.decode` sizes caches so that never happens.
        """
        b, t = k_new.shape[:2]
        rows = jnp.arange(b)[:, None]
        if slots is None:
            slots = self.filled[:, None] + jnp.arange(t)[None, :]
        k = self.k.at[layer, rows, slots].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[layer, rows, slots].set(v_new.astype(self.v.dtype), mode="drop")
        return self.replace(k=k, v=v)

    def attention_mask(self, block_mask: Bool[Array, "B T W"]) -> Bool[Array, "B T S"]:
        """Which cache slots each new token sees: every committed slot, plus the window of slots
        `[filled, filled + W)` where `block_mask` allows (causal for chains and prefill, the
        ancestor mask for trees, W = T unless the block was written at explicit slots)."""
        w = block_mask.shape[-1]
        rel = jnp.arange(self.size)[None, :] - self.filled[:, None]  # [B, S] slot index within window
        in_window = (rel >= 0) & (rel < w)
        idx = jnp.broadcast_to(jnp.clip(rel, 0, w - 1)[:, None, :], block_mask.shape[:2] + (self.size,))
        from_window = jnp.take_along_axis(block_mask, idx, axis=2) & in_window[:, None, :]
        return (rel < 0)[:, None, :] | from_window

    def advance(self, n: Int[Array, " B"] | int) -> KVCache:
        """Keep the first `n[b]` slots of the last written block (AR step, accepted chain prefix)."""
        return self.replace(lengths=self.lengths + n)

    def commit(self, path: Int[Array, "B P"], n_keep: Int[Array, " B"]) -> KVCache:
        """Move the last block's slots `filled + path[b, :]` to `filled + [0, P)` and keep `n_keep[b]`.

        `path[b, i]` is the block index of the i-th token to keep (a root-to-node tree path, so it is
        increasing); entries at `i >= n_keep[b]` are ignored. Gathers first, then writes, so
        overlapping source/destination slots are safe.
        """
        b, p = path.shape
        filled = self.filled
        src = filled[:, None] + path  # [B, P]
        rows = jnp.arange(b)[:, None]
        dst = filled[:, None] + jnp.arange(p)[None, :]
        k = self.k.at[:, rows, dst].set(self.k[:, rows, src], mode="drop")
        v = self.v.at[:, rows, dst].set(self.v[:, rows, src], mode="drop")
        return self.replace(k=k, v=v, lengths=self.lengths + n_keep)


def causal_mask(batch: int, t: int) -> Bool[Array, "B T T"]:
    """The block mask of a chain or prompt: token i sees tokens 0..i of the block."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))

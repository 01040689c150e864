"""Attention of a block of new tokens over the KV cache: XLA's einsum, the CPU kernel, or split.

`cache_mask` builds the `[B, T, S]` visibility of cache slots once per forward; `attend` is the
plain GQA attention (any backend, any dtype); `attend_cache` runs `specdec/kernels/cache_attention.cc`
on CPU — it reads only the filled prefix of the cache (`visible_limit`) and no head-major copy of
K and V — and falls back to `attend` where the kernel is not used. Both give float32 softmax.
`attend_split` attends the committed prefix and the new block apart and merges them by
log-sum-exp; its prefix half runs as XLA einsums or (`flash=True`) through Pallas's split-K
decode-attention kernel (`prefix_flash`), the length-masked form accelerator kernels take.
`attend_shared` is Hydragen's attention over a shared prefix level (`KVCache.shared`): the
queries of all rows of a group as one batch against the group's one copy of the prefix, merged
with the rows' own attention by log-sum-exp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from specdec import kernels
from specdec.cache import KVCache, SharedSegment

if TYPE_CHECKING:  # the models import attention; attention only needs the config's type
    from specdec.models.config import ModelConfig

NEG_INF = -1e30  # finite, so a fully masked row cannot produce NaN
# The CPU attention kernel runs blocks of up to this many tokens (every decode and verification
# block: trees up to 128 nodes keep its row independence); longer blocks use XLA's attention (one
# 384-token block of 8 rows on one Zen 4 core: 21.8 s with the kernel, 14.2 s without). Prompts
# longer than this are prefilled in chunks of this size through the kernel (`specdec.prefill`).
KERNEL_MAX_BLOCK = 128


def attend(q: Float[Array, "B T Hq Dh"], k: Float[Array, "B S Hkv Dh"], v: Float[Array, "B S Hkv Dh"],
           mask: Bool[Array, "B T S"], cfg: ModelConfig) -> Float[Array, "B T HqDh"]:  # fmt: skip
    """GQA attention of q over k, v under `mask` (XLA einsums)."""
    b, t = q.shape[:2]
    q = q.reshape(b, t, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (cfg.head_dim**-0.5)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, cfg.num_heads * cfg.head_dim)


def attend_lse(q: Float[Array, "B T Hq Dh"], k: Float[Array, "B S Hkv Dh"], v: Float[Array, "B S Hkv Dh"],
               mask: Bool[Array, "B T|1 S"], cfg: ModelConfig):  # fmt: skip
    """GQA attention that also returns each query's log-sum-exp of scores (float32).

    Returns (out [B, T, Hkv, G, Dh] float32, lse [B, T, Hkv, G]); a fully masked query gets
    lse ≈ NEG_INF, so it weighs nothing when merged (`merge_lse`)."""
    b, t = q.shape[:2]
    q = q.reshape(b, t, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
    scores = jnp.einsum("btkgd,bskd->btkgs", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None, None], scores * (cfg.head_dim**-0.5), NEG_INF)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None])
    return jnp.einsum("btkgs,bskd->btkgd", probs, v.astype(jnp.float32)), lse


def merge_lse(parts) -> Float[Array, "B T HqDh"]:
    """Attention over the union of disjoint key sets from the per-set (out, lse) of `attend_lse`."""
    m = jnp.max(jnp.stack([lse for _, lse in parts]), axis=0)
    w = [jnp.exp(lse - m)[..., None] for _, lse in parts]
    out = sum(wi * o for wi, (o, _) in zip(w, parts, strict=True)) / sum(w)
    return out.reshape(out.shape[:2] + (-1,))


def flash_splits(size: int) -> tuple[int, int] | None:
    """(k_splits, block_k) for Pallas's decode kernel over a cache of `size` slots, or None when
    the size does not tile (it needs size = k_splits · n with n >= 16 a multiple of a power-of-two
    block_k in [16, 128])."""
    for splits in (16, 8, 4, 2, 1):
        n = size // splits
        if size % splits or n < 16:
            continue
        block = next((b for b in (128, 64, 32, 16) if n % b == 0), None)
        if block is not None:
            return splits, block
    return None


def flash_size(size: int) -> int:
    """The smallest cache size >= `size` that `flash_splits` tiles (a multiple of 16 always does)."""
    return -(-size // 16) * 16


def prefix_flash(q: Float[Array, "B T Hq Dh"], k: Float[Array, "B S Hkv Dh"], v: Float[Array, "B S Hkv Dh"],
                 lengths: Int[Array, " B"], cfg: ModelConfig):  # fmt: skip
    """`attend_lse` over the committed slots `< lengths` through Pallas's split-K decode-attention
    kernel (`jax.experimental.pallas.ops.gpu.decode_attention.gqa`, which returns the softmax
    residuals): Triton on a GPU, Pallas's interpreter on other backends (exact, slow: for tests).

    The T block tokens of a row share its prefix, so they ride as extra query heads of each KV
    head ([B, Hkv·T·G, Dh]): one kernel call, K and V read once. Returns (out [B, T, Hkv, G, Dh]
    float32, lse [B, T, Hkv, G]); a row with an empty prefix gets out 0, lse NEG_INF.
    The cache size must tile the kernel (`flash_splits`).

    On a mesh (the context mesh, which `generate(mesh=...)` sets for its run) the kernel runs on
    each device's shard under `jax.shard_map`: rows on `data`, KV heads with their query heads on
    `model` — the target cache's own layout (`specdec.sharding`), so attention moves no data; the
    kernel is the same per-shard call, a shard being a smaller model of Hkv / model KV heads."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _prefix_flash_shard(q, k, v, lengths, cfg)
    m = mesh.shape["model"]
    shard_cfg = cfg.replace(num_heads=cfg.num_heads // m, num_kv_heads=cfg.num_kv_heads // m, tp_groups=1)
    heads = P("data", None, "model", None)
    run = jax.shard_map(
        lambda *a: _prefix_flash_shard(*a, shard_cfg),
        in_specs=(heads, heads, heads, P("data")),
        out_specs=(P("data", None, "model", None, None), P("data", None, "model", None)),
        check_vma=False,  # the Pallas call carries no varying-axes annotations
    )
    return run(q, k, v, lengths)


def _prefix_flash_shard(q, k, v, lengths, cfg: ModelConfig):
    """`prefix_flash` on one device's arrays (`cfg`: that shard's heads)."""
    b, t = q.shape[:2]
    kv, g, dh = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    tiling = flash_splits(k.shape[1])
    from jax.experimental.pallas.ops.gpu import decode_attention  # noqa: PLC0415 (Pallas: only here)

    heads = q.reshape(b, t, kv, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv * t * g, dh)
    out, (norm, m) = decode_attention.gqa(
        heads, k, v, kv_seq_len=lengths, sm_scale=dh**-0.5, k_splits=tiling[0], block_k=tiling[1],
        return_residuals=True, interpret=jax.default_backend() != "gpu",
    )  # fmt: skip
    out = out.astype(jnp.float32).reshape(b, kv, t, g, dh).transpose(0, 2, 1, 3, 4)
    lse = (m + jnp.log(norm)).reshape(b, kv, t, g).transpose(0, 2, 1, 3)
    empty = (lengths == 0)[:, None, None, None]  # the kernel's residuals are NaN there
    return jnp.where(empty[..., None], 0.0, out), jnp.where(empty, NEG_INF, lse)


def attend_split(q: Float[Array, "B T Hq Dh"], k_new: Float[Array, "B T Hkv Dh"],
                 v_new: Float[Array, "B T Hkv Dh"], cache: KVCache, layer: int | Int[Array, ""],
                 block_mask: Bool[Array, "B T T"], cfg: ModelConfig, *, flash: bool = False,
                 ) -> Float[Array, "B T HqDh"]:  # fmt: skip
    """Split-prefix attention: the committed cache prefix (slots < lengths, every block token sees
    all of it) and the new block (dense, under its causal or tree-ancestor `block_mask`), attended
    separately and merged by log-sum-exp — equal to attending over the cache with the combined
    mask. The prefix half needs no per-token mask, so an accelerator runs it as ragged
    (length-masked) attention (`flash`: `prefix_flash`); the block half is small. No sliding
    window, no explicit slots. `flash` needs a cache size the kernel tiles (`flash_size`; the host
    driver sizes caches so): any other size is refused, never silently run another way."""
    if flash:
        if flash_splits(cache.size) is None:
            raise ValueError(
                f"a cache of {cache.size} slots does not tile the flash attention kernel; size it with "
                f"specdec.attention.flash_size ({flash_size(cache.size)})"
            )
        prefix = prefix_flash(q, cache.k[layer], cache.v[layer], cache.filled, cfg)
    else:
        committed = jnp.arange(cache.size)[None, None, :] < cache.filled[:, None, None]  # [B, 1, S]
        prefix = attend_lse(q, cache.k[layer], cache.v[layer], committed, cfg)
    block = attend_lse(q, k_new, v_new, block_mask, cfg)
    parts = [attend_shared(q, seg, layer, cfg, kernel=False) for seg in cache.shared]
    return merge_lse([*parts, prefix, block]).astype(q.dtype)


def cache_mask(
    cfg: ModelConfig,
    positions: Int[Array, "B T"],
    cache: KVCache | None,
    block_mask: Bool[Array, "B T W"],
    slots: Int[Array, "B T"] | None,
) -> Bool[Array, "B T S"]:
    """[B,T,S] visibility over the cache (or [B,T,T] without one), with Mistral's sliding window."""
    if cache is None:
        mask, key_pos = block_mask, positions
    else:
        mask = cache.attention_mask(block_mask)
        # Committed slot j holds position j; block slot lengths + i holds positions[:, i]. With
        # explicit slots (a drafter expanding tree nodes) window slots are taken as their index,
        # which overestimates a tree node's position by < W: the window may shrink by that much.
        # (A shared prefix takes no sliding window: `specdec.compose` refuses the pair.)
        slot = jnp.arange(cache.size)[None, :]
        key_pos = slot
        if slots is None:
            rel = jnp.clip(slot - cache.filled[:, None], 0, positions.shape[1] - 1)
            key_pos = jnp.where(slot < cache.filled[:, None], slot, jnp.take_along_axis(positions, rel, 1))
    if cfg.sliding_window is not None:
        mask = mask & (positions[:, :, None] - key_pos[:, None, :] < cfg.sliding_window)
    return mask


def visible_limit(mask: Bool[Array, "B T S"]) -> Int[Array, " B"]:
    """Per row, 1 + the last slot any block token sees (0 if none): the kernel reads no further."""
    seen = jnp.any(mask, axis=1)
    return jnp.max(jnp.where(seen, jnp.arange(1, mask.shape[-1] + 1, dtype=jnp.int32), 0), axis=-1)


def attend_cache(q: Float[Array, "B T Hq Dh"], cache: KVCache, layer: int | Int[Array, ""],
                 mask: Bool[Array, "B T S"], cfg: ModelConfig, *, kernel: bool,
                 limit: Int[Array, " B"] | None = None) -> Float[Array, "B T HqDh"]:  # fmt: skip
    """Attention over layer `layer` of `cache` (after the block was written into it), its shared
    prefix levels included.

    `kernel=True` uses the CPU kernel for float32 caches when it is built; `limit` (from
    `visible_limit(mask)`, computed once per forward) bounds the slots it reads.
    """
    kernel = kernel and cache.k.dtype == jnp.float32 and kernels.available()
    if cache.shared:
        own = attend_kv_lse(q, cache.k, cache.v, layer, mask, cfg, kernel=kernel, limit=limit)
        parts = [attend_shared(q, seg, layer, cfg, kernel=kernel) for seg in cache.shared]
        return merge_lse([*parts, own]).astype(q.dtype)
    if not kernel:
        return attend(q, cache.k[layer], cache.v[layer], mask, cfg)
    return _kernel_call(q, cache.k, cache.v, layer, mask, limit, cfg, lse=False)


def _kernel_call(q, k, v, layer, mask, limit, cfg: ModelConfig, *, lse: bool):
    """The CPU kernel over `k, v [L, B, S, Hkv, Dh]`: out [B, T, Hq Dh] (and lse [B, T, Hq])."""
    b, t = q.shape[:2]
    limit = visible_limit(mask) if limit is None else limit
    out = jax.ShapeDtypeStruct((b, t, cfg.num_heads * cfg.head_dim), jnp.float32)
    if lse:
        out = (out, jax.ShapeDtypeStruct((b, t, cfg.num_heads), jnp.float32))
    call = jax.ffi.ffi_call(kernels.CACHE_ATTENTION_LSE if lse else kernels.CACHE_ATTENTION, out,
                            vmap_method="sequential")  # fmt: skip
    layer = jnp.asarray(layer, jnp.int32)
    scale = np.float32(cfg.head_dim**-0.5)
    return call(q.astype(jnp.float32), k, v, layer, mask, limit.astype(jnp.int32), scale=scale,
                isa=np.int64(kernels.isa_cap()), threads=np.int64(0))  # fmt: skip


def attend_kv_lse(q: Float[Array, "B T Hq Dh"], k: Float[Array, "L B S Hkv Dh"],
                  v: Float[Array, "L B S Hkv Dh"], layer: int | Int[Array, ""], mask: Bool[Array, "B T|1 S"],
                  cfg: ModelConfig, *, kernel: bool, limit: Int[Array, " B"] | None = None):  # fmt: skip
    """`attend_lse` over layer `layer` of stacked K/V: through the CPU kernel (`kernel`: float32
    K/V, kernel built; `mask` then [B, T, S], `limit` as `attend_cache`'s) or XLA's einsums.
    Returns (out [B, T, Hkv, G, Dh] float32, lse [B, T, Hkv, G])."""
    if not kernel:
        return attend_lse(q, k[layer], v[layer], mask, cfg)
    b, t = q.shape[:2]
    mask = jnp.broadcast_to(mask, (b, t, k.shape[2]))
    out, lse = _kernel_call(q, k, v, layer, mask, limit, cfg, lse=True)
    shape = (b, t, cfg.num_kv_heads, cfg.q_per_kv)
    return out.reshape(shape + (cfg.head_dim,)), lse.reshape(shape)


def attend_shared(q: Float[Array, "B T Hq Dh"], seg: SharedSegment, layer: int | Int[Array, ""],
                  cfg: ModelConfig, *, kernel: bool):  # fmt: skip
    """Attention of every block token over its group's shared prefix (Hydragen's inter-sequence
    batching): the B/G rows of a group are contiguous, so their queries reshape to one sequence
    [G, (B/G) T, Hq, Dh] that attends the group's single copy of the prefix with no per-token
    mask (every token sees all `seg.lengths[g]` slots): K and V are read once per group, not once
    per row. `kernel`: through the CPU kernel (float32), else XLA's einsums.
    Returns (out [B, T, Hkv, G', Dh] float32, lse [B, T, Hkv, G']) for `merge_lse`."""
    b, t = q.shape[:2]
    g = seg.groups
    qg = q.reshape((g, (b // g) * t) + q.shape[2:])
    seen = jnp.arange(seg.k.shape[2])[None, None, :] < seg.lengths[:, None, None]  # [G, 1, P]
    out, lse = attend_kv_lse(qg, seg.k, seg.v, layer, seen, cfg, kernel=kernel and seg.k.dtype == jnp.float32,
                             limit=seg.lengths)  # fmt: skip
    return out.reshape((b, t) + out.shape[2:]), lse.reshape((b, t) + lse.shape[2:])

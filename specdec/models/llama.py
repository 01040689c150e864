"""Pure-functional Llama-family decoder: Llama 1/2/3, Mistral, Qwen2, SmolLM2.

`forward` runs a block of T new tokens per row against a KV cache. The block can be a prompt, one
AR token, a chain of drafts or a whole draft tree: `block_mask` says which block tokens see each
other (causal for chains, the ancestor mask for trees) and `positions` gives each token's RoPE
position (per row; `lengths + depth` for a tree). Everything committed in the cache is visible.

Params (see `specdec.loading`): `embed [V, D]`, `final_norm [D]`, optional `lm_head [D, V]`
(absent = tied to `embed`), and `layers`: a list of per-layer dicts (unrolled) or one dict of
arrays stacked on a leading L axis (`cfg.scan_layers`). Per layer: `attn_norm [D]`,
`wqkv [D, (Hq + 2 Hkv) Dh]`, optional `bqkv`, `wo [Hq Dh, D]`, `mlp_norm [D]`,
`w_gate_up [D, 2 I]`, `w_down [I, D]`. Fused projections: fewer, larger matmuls decode faster.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from specdec.attention import KERNEL_MAX_BLOCK, attend, attend_cache, attend_split, cache_mask, visible_limit
from specdec.cache import KVCache
from specdec.matmul import choose_layout, dense, layout_of, pack_params
from specdec.models.config import ModelConfig
from specdec.models.rope import apply_rope, rope_tables

Params = dict[str, Any]


def to_device(params: Params, cfg: ModelConfig, layout: str | None = None) -> Params:
    """Cast host params to `cfg.dtype` on device; stack the layers when `cfg.scan_layers`.

    `layout` is the dense weights' layout (`specdec.matmul`): None chooses per backend ("packed" on
    CPU with the kernel built, "plain" elsewhere). A packed tied model gets a packed `lm_head`
    (the embedding transposed) beside the plain `embed` it still gathers from.
    """
    dtype = jnp.dtype(cfg.dtype)
    layout = layout or choose_layout(dtype)
    cast = lambda x: jnp.asarray(x, dtype)
    out = {k: cast(v) for k, v in params.items() if k != "layers"}
    layers = params["layers"]
    if cfg.scan_layers and isinstance(layers, (list, tuple)):
        out["layers"] = {k: cast(np.stack([lp[k] for lp in layers])) for k in layers[0]}
    else:
        out["layers"] = jax.tree.map(cast, layers)
    if layout == "packed" and "lm_head" not in out:
        out["lm_head"] = out["embed"].T  # packed below, like every dense weight
    return pack_params(out, layout)


def rms_norm(x: Float[Array, "... D"], w: Float[Array, " D"], eps: float) -> Float[Array, "... D"]:
    # Statistics in float32 whatever the activation dtype, as the reference does.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * x32.astype(x.dtype)


def split_qkv(cfg: ModelConfig, qkv: Float[Array, "... F"]):
    """q [..., Hq, Dh], k and v [..., Hkv, Dh] from the fused projection, in `cfg.tp_groups` groups.

    Each of the G column groups is [q | k | v] of its heads, so a shard of G-way tensor
    parallelism splits locally; G = 1 is the plain [q | k | v] layout."""
    g, dh = cfg.tp_groups, cfg.head_dim
    nq, nkv = cfg.num_heads // g, cfg.num_kv_heads // g
    sh = qkv.shape[:-1]
    x = qkv.reshape(sh + (g, (nq + 2 * nkv) * dh))
    q = x[..., : nq * dh].reshape(sh + (g * nq, dh))
    k = x[..., nq * dh : (nq + nkv) * dh].reshape(sh + (g * nkv, dh))
    return q, k, x[..., (nq + nkv) * dh :].reshape(sh + (g * nkv, dh))


def split_gate_up(cfg: ModelConfig, x: Float[Array, "... 2I"]) -> tuple[Array, Array]:
    """gate, up [..., I] from the fused MLP projection (G column groups [gate | up], see `split_qkv`)."""
    g = cfg.tp_groups
    sh = x.shape[:-1]
    x = x.reshape(sh + (g, 2, x.shape[-1] // (2 * g)))
    return x[..., 0, :].reshape(sh + (-1,)), x[..., 1, :].reshape(sh + (-1,))


def scatter_block(x: Float[Array, "1 M ..."], compact: Int[Array, " M"], b: int, t: int) -> Array:
    """The M computed tokens of a flattened ragged block at their `[B, T, ...]` places (zeros elsewhere)."""
    out = jnp.zeros((b * t,) + x.shape[2:], x.dtype).at[compact].set(x[0])
    return out.reshape((b, t) + x.shape[2:])


def _layer(lp, h, cos, sin, mask, limit, cache: KVCache | None, slots, layer_idx, cfg: ModelConfig,
           block_mask=None, compact=None, block_shape=None):  # fmt: skip
    """One decoder layer; writes this layer's new keys/values into `cache` (when given).

    `limit` (the slots the block sees, `visible_limit`) is given when the CPU attention kernel runs;
    `block_mask` when split-prefix attention runs (`cfg.attention` "split" or "flash"). With `compact`,
    `h` is `[1, M, D]`, the block tokens `compact` of the `block_shape` = (B, T) block: the
    projections and the MLP run on those M, attention on the `[B, T]` layout.
    """
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    qkv = dense(x, lp["wqkv"]).astype(h.dtype)
    if "bqkv" in lp:
        qkv = qkv + lp["bqkv"]
    q, k, v = split_qkv(cfg, qkv)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if compact is not None:
        q, k, v = (scatter_block(y, compact, *block_shape) for y in (q, k, v))
    if cache is None:
        attn = attend(q, k, v, mask, cfg)  # no cache: the block attends to itself only
    else:
        cache = cache.write(layer_idx, k, v, slots)
        if block_mask is not None:
            attn = attend_split(q, k, v, cache, layer_idx, block_mask, cfg, flash=cfg.attention == "flash")
        else:
            attn = attend_cache(q, cache, layer_idx, mask, cfg, kernel=limit is not None, limit=limit)
    if compact is not None:
        attn = attn.reshape((-1, attn.shape[-1]))[compact][None]
    h = h + dense(attn.astype(h.dtype), lp["wo"]).astype(h.dtype)
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    gate, up = split_gate_up(cfg, dense(x, lp["w_gate_up"]).astype(h.dtype))
    h = h + dense(jax.nn.silu(gate) * up, lp["w_down"]).astype(h.dtype)
    return h, cache


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    cache: KVCache | None,
    block_mask: Bool[Array, "B T W"],
    *,
    taps: tuple[int, ...] = (),
    logits_idx: Int[Array, "B K"] | None = None,
    slots: Int[Array, "B T"] | None = None,
    compact: Int[Array, " M"] | None = None,
) -> tuple[Float[Array, "B K V"], tuple[Float[Array, "B T D"], ...], KVCache | None]:
    """Run T new tokens per row; return (logits, hidden taps, cache with the block written).

    The block's keys/values land at cache slots `[lengths, lengths + T)`; `lengths` is unchanged
    (see `KVCache.advance` / `commit`). `cache=None` attends within the block only (teacher-forced
    training and feature extraction). `taps` picks hidden states to return, HF `hidden_states`
    numbering: tap i < L is the residual stream entering layer i (0 = embeddings), tap L the final
    normed hidden state. `logits_idx` selects which block positions get logits (K of them; all T
    if None) — the LM head is the largest matmul, so prefill asks only for the last position.
    `compact` (M flat indices into the B*T block) computes only those tokens: a flattened ragged
    block (`specdec.trees.budget`); logits and taps elsewhere are zeros and those cache slots hold
    garbage (they must be invalid tree nodes, which nothing attends to). Logits are float32.
    """
    block_shape = tokens.shape
    if compact is not None:
        if logits_idx is not None:
            raise ValueError("forward: compact and logits_idx cannot be combined")
        h = params["embed"][tokens.reshape(-1)[compact]][None]  # [1, M, D]
        cos, sin = rope_tables(cfg, positions.reshape(-1)[compact][None])
    else:
        h = params["embed"][tokens]
        cos, sin = rope_tables(cfg, positions)
    mask = cache_mask(cfg, positions, cache, block_mask, slots)
    if compact is not None:  # uncomputed block tokens see nothing: the CPU kernel skips them
        computed = jnp.zeros(block_shape[0] * block_shape[1], bool).at[compact].set(True)
        mask = mask & computed.reshape(block_shape)[..., None]
    # Packed weights (the CPU layout) also select the CPU attention kernel over the cache prefix,
    # for decode and verification blocks; a long block (a prefill) is faster in XLA's attention.
    kernel = (cache is not None and layout_of(params["layers"]) == "packed"
              and tokens.shape[1] <= KERNEL_MAX_BLOCK)  # fmt: skip
    limit = visible_limit(mask) if kernel else None
    # Split-prefix attention needs the block at its own window (no explicit slots) and no window.
    split = cfg.attention != "dense" and cache is not None and slots is None and cfg.sliding_window is None
    bm = block_mask if split else None
    n = cfg.num_layers
    tapped: dict[int, Array] = {}
    if cfg.scan_layers:

        def body(carry, xs):
            h, c = carry
            lp, i = xs
            h_in = h
            h, c = _layer(lp, h, cos, sin, mask, limit, c, slots, i, cfg, bm, compact, block_shape)
            return (h, c), h_in

        (h, cache), stream = jax.lax.scan(body, (h, cache), (params["layers"], jnp.arange(n)))
        tapped = {i: stream[i] for i in taps if i < n}
    else:
        for i, lp in enumerate(params["layers"]):
            if i in taps:
                tapped[i] = h
            h, cache = _layer(lp, h, cos, sin, mask, limit, cache, slots, i, cfg, bm, compact, block_shape)
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    tapped[n] = h
    if logits_idx is not None:
        h = jnp.take_along_axis(h, logits_idx[..., None], axis=1)
    logits = lm_head(params, h)
    out = tuple(tapped[i] for i in taps)
    if compact is not None:  # back to the [B, T] block layout
        logits = scatter_block(logits, compact, *block_shape)
        out = tuple(scatter_block(x, compact, *block_shape) for x in out)
    return logits, out, cache


def lm_head(params: Params, h: Float[Array, "... D"]) -> Float[Array, "... V"]:
    """Project normed hidden states to float32 vocabulary logits (tied or untied head)."""
    if "lm_head" in params:
        return dense(h, params["lm_head"])
    return jnp.einsum("...d,vd->...v", h, params["embed"], preferred_element_type=jnp.float32)

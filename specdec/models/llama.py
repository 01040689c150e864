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

from specdec.cache import KVCache
from specdec.models.config import ModelConfig
from specdec.models.rope import apply_rope, rope_tables

Params = dict[str, Any]
_NEG_INF = -1e30  # finite, so a fully masked row cannot produce NaN


def to_device(params: Params, cfg: ModelConfig) -> Params:
    """Cast host params to `cfg.dtype` on device; stack the layers when `cfg.scan_layers`."""
    dtype = jnp.dtype(cfg.dtype)
    cast = lambda x: jnp.asarray(x, dtype)
    out = {k: cast(v) for k, v in params.items() if k != "layers"}
    layers = params["layers"]
    if cfg.scan_layers and isinstance(layers, (list, tuple)):
        out["layers"] = {k: cast(np.stack([lp[k] for lp in layers])) for k in layers[0]}
    else:
        out["layers"] = jax.tree.map(cast, layers)
    return out


def rms_norm(x: Float[Array, "... D"], w: Float[Array, " D"], eps: float) -> Float[Array, "... D"]:
    # Statistics in float32 whatever the activation dtype, as the reference does.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * x32.astype(x.dtype)


def _attend(q, k, v, mask: Bool[Array, "B T S"], cfg: ModelConfig):
    """GQA attention of q [B,T,Hq,Dh] over k, v [B,S,Hkv,Dh] under mask [B,T,S] -> [B,T,Hq*Dh]."""
    b, t = q.shape[:2]
    q = q.reshape(b, t, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (cfg.head_dim**-0.5)
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, cfg.num_heads * cfg.head_dim)


def _layer(lp, h, cos, sin, mask, cache: KVCache | None, slots, layer_idx, cfg: ModelConfig):
    """One decoder layer; writes this layer's new keys/values into `cache` (when given)."""
    b, t, _ = h.shape
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    qkv = x @ lp["wqkv"]
    if "bqkv" in lp:
        qkv = qkv + lp["bqkv"]
    nq, nkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = qkv[..., : nq * dh].reshape(b, t, nq, dh)
    k = qkv[..., nq * dh : (nq + nkv) * dh].reshape(b, t, nkv, dh)
    v = qkv[..., (nq + nkv) * dh :].reshape(b, t, nkv, dh)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is None:
        keys, values = k, v  # no cache: the block attends to itself only
    else:
        cache = cache.write(layer_idx, k, v, slots)
        keys, values = cache.k[layer_idx], cache.v[layer_idx]
    h = h + _attend(q, keys, values, mask, cfg) @ lp["wo"]
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    gate, up = jnp.split(x @ lp["w_gate_up"], 2, axis=-1)
    h = h + (jax.nn.silu(gate) * up) @ lp["w_down"]
    return h, cache


def _full_mask(cfg, positions, cache: KVCache | None, block_mask, slots):
    """[B,T,S] visibility over the cache (or [B,T,T] without one), with Mistral's sliding window."""
    if cache is None:
        mask, key_pos = block_mask, positions
    else:
        mask = cache.attention_mask(block_mask)
        # Committed slot j holds position j; block slot lengths + i holds positions[:, i]. With
        # explicit slots (a drafter expanding tree nodes) window slots are taken as their index,
        # which overestimates a tree node's position by < W: the window may shrink by that much.
        slot = jnp.arange(cache.size)[None, :]
        key_pos = slot
        if slots is None:
            rel = jnp.clip(slot - cache.lengths[:, None], 0, positions.shape[1] - 1)
            key_pos = jnp.where(slot < cache.lengths[:, None], slot, jnp.take_along_axis(positions, rel, 1))
    if cfg.sliding_window is not None:
        mask = mask & (positions[:, :, None] - key_pos[:, None, :] < cfg.sliding_window)
    return mask


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
) -> tuple[Float[Array, "B K V"], tuple[Float[Array, "B T D"], ...], KVCache | None]:
    """Run T new tokens per row; return (logits, hidden taps, cache with the block written).

    The block's keys/values land at cache slots `[lengths, lengths + T)`; `lengths` is unchanged
    (see `KVCache.advance` / `commit`). `cache=None` attends within the block only (teacher-forced
    training and feature extraction). `taps` picks hidden states to return, HF `hidden_states`
    numbering: tap i < L is the residual stream entering layer i (0 = embeddings), tap L the final
    normed hidden state. `logits_idx` selects which block positions get logits (K of them; all T
    if None) — the LM head is the largest matmul, so prefill asks only for the last position.
    Logits are float32.
    """
    h = params["embed"][tokens]
    cos, sin = rope_tables(cfg, positions)
    mask = _full_mask(cfg, positions, cache, block_mask, slots)
    n = cfg.num_layers
    tapped: dict[int, Array] = {}
    if cfg.scan_layers:

        def body(carry, xs):
            h, c = carry
            lp, i = xs
            h_in = h
            h, c = _layer(lp, h, cos, sin, mask, c, slots, i, cfg)
            return (h, c), h_in

        (h, cache), stream = jax.lax.scan(body, (h, cache), (params["layers"], jnp.arange(n)))
        tapped = {i: stream[i] for i in taps if i < n}
    else:
        for i, lp in enumerate(params["layers"]):
            if i in taps:
                tapped[i] = h
            h, cache = _layer(lp, h, cos, sin, mask, cache, slots, i, cfg)
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    tapped[n] = h
    if logits_idx is not None:
        h = jnp.take_along_axis(h, logits_idx[..., None], axis=1)
    logits = lm_head(params, h)
    return logits, tuple(tapped[i] for i in taps), cache


def lm_head(params: Params, h: Float[Array, "... D"]) -> Float[Array, "... V"]:
    """Project normed hidden states to float32 vocabulary logits (tied or untied head)."""
    if "lm_head" in params:
        return jnp.dot(h, params["lm_head"], preferred_element_type=jnp.float32)
    return jnp.einsum("...d,vd->...v", h, params["embed"], preferred_element_type=jnp.float32)

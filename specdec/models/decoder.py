"""The decoder layer, one implementation for the target (`models/llama.py`) and every draft stack
(EAGLE-1/2/3, Falcon, DFlash, Amphista): pre-norm, GQA attention with RoPE, SwiGLU MLP.

    h → input norm → fused q/k/v (+ bias) → (q/k norm) → RoPE      `qkv`  (`kv`: keys/values only)
      → attention: the block alone, or over a KV cache after writing the block's K/V   `attention`
      → output projection + residual → norm → SwiGLU MLP + residual                    `finish`

`layer` chains the three; a drafter calls the blocks apart where its keys/values come from
elsewhere (DFlash's injected target features, EAGLE-3's training-time test, Falcon's passes).
Options cover every form the stacks use: the input norm (`norm`: one weight, a pair over the two
halves of a `[embedding ; feature]` input as EAGLE-3's, or none as EAGLE-1's), a residual other
than the layer's input (`resid`), and the target's attention paths (dense, split / flash, the CPU
cache kernel, sliding window through the mask, compact ragged blocks).

A layer's params: the input norm (`attn_norm [Din]` in the target's layers, `input_norm [Din]` in
draft layers; EAGLE-3 `input_norm`, `hidden_norm [D]` over the halves; EAGLE-1 none),
`wqkv [Din, (Hq + 2 Hkv) Dh]`, optional `bqkv [(Hq + 2 Hkv) Dh]` (Qwen2), optional `q_norm`,
`k_norm [Dh]` (Qwen3), `wo [Hq Dh, D]`, `mlp_norm [D]`, `w_gate_up [D, 2 I]`, `w_down [I, D]`;
dense weights plain or packed (`specdec.matmul`). Fused projections hold `cfg.tp_groups` column
groups (`split_qkv`).

Dtypes: projections accumulate in float32 (`dense`) and are cast back to the activation dtype, so
a bfloat16 target keeps bfloat16 activations; drafters run float32 activations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from specdec.attention import attend, attend_cache, attend_split
from specdec.cache import KVCache
from specdec.matmul import dense
from specdec.models.config import ModelConfig
from specdec.models.rope import apply_rope, rope_tables

Norm = str | tuple[str, ...] | None
Rope = Int[Array, "B T"] | tuple[Float[Array, "B T Dh"], Float[Array, "B T Dh"]]


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


def init_layer(key, cfg: ModelConfig, din: int | None = None) -> dict:
    """Random draft-layer params with an `input_norm` (output projections scaled by 0.1: a new
    layer starts near identity)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    din = din or d
    nq = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    k = jax.random.split(key, 4)
    w = lambda k, a, b: jax.random.normal(k, (a, b), jnp.float32) * (a**-0.5)  # noqa: E731
    return {"input_norm": jnp.ones((din,)), "wqkv": w(k[0], din, nq),
            "wo": w(k[1], cfg.num_heads * cfg.head_dim, d) * 0.1, "mlp_norm": jnp.ones((d,)),
            "w_gate_up": w(k[2], d, 2 * i), "w_down": w(k[3], i, d) * 0.1}  # fmt: skip


def pre_norm(lp, cfg: ModelConfig, h: Float[Array, "... Din"], norm: Norm) -> Float[Array, "... Din"]:
    """`h` through the layer's input norm: `norm` names its weight; a tuple of names normalises
    consecutive parts of `h` (as wide as their weights) apart, EAGLE-3's `[embedding ; feature]`
    with (`input_norm`, `hidden_norm`); None leaves `h` as it is (EAGLE-1, injected features)."""
    if norm is None:
        return h
    if isinstance(norm, str):
        return rms_norm(h, lp[norm], cfg.rms_norm_eps)
    cuts = np.cumsum([lp[n].shape[-1] for n in norm])[:-1].tolist()
    parts = jnp.split(h, cuts, axis=-1)
    normed = [rms_norm(x, lp[n], cfg.rms_norm_eps) for x, n in zip(parts, norm, strict=True)]
    return jnp.concatenate(normed, axis=-1)


def qkv(lp, cfg: ModelConfig, h: Float[Array, "B T Din"], positions: Rope, *, norm: Norm = "input_norm"):
    """RoPE'd q [B, T, Hq, Dh], k and v [B, T, Hkv, Dh] of `h` [B, T, Din], through the input
    norm `norm` first (`pre_norm`).

    `positions [B, T]` or their RoPE tables `(cos, sin)` (`rope_tables`, computed once for a
    stack of layers). Layers with `bqkv` add it to the projection; layers with `q_norm` / `k_norm`
    (Qwen3's, e.g. DFlash checkpoints) RMS-normalise each head of q and k before RoPE."""
    y = dense(pre_norm(lp, cfg, h, norm), lp["wqkv"]).astype(h.dtype)
    if "bqkv" in lp:
        y = y + lp["bqkv"]
    q, k, v = split_qkv(cfg, y)
    if "q_norm" in lp:
        q, k = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps), rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    cos, sin = positions if isinstance(positions, tuple) else rope_tables(cfg, positions)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def kv(lp, cfg: ModelConfig, x: Float[Array, "B T Din"], positions: Rope):
    """RoPE'd keys and values [B, T, Hkv, Dh] of `x` as given (no input norm): injected features."""
    _, k, v = qkv(lp, cfg, x, positions, norm=None)
    return k, v


def attention(q: Float[Array, "B T Hq Dh"], k: Float[Array, "B T Hkv Dh"], v: Float[Array, "B T Hkv Dh"],
              cfg: ModelConfig, mask: Bool[Array, "B T S"], cache: KVCache | None = None,
              layer: int | Int[Array, ""] = 0, *, slots: Int[Array, "B T"] | None = None,
              kernel: bool = False, limit: Int[Array, " B"] | None = None,
              block_mask: Bool[Array, "B T W"] | None = None, compact: Int[Array, " M"] | None = None,
              block_shape: tuple[int, int] | None = None,
              ) -> tuple[Float[Array, "B T HqDh"], KVCache | None]:  # fmt: skip
    """The block's attention output and the cache with its keys/values written into `layer`.

    Without a cache the block attends to itself under `mask [B, T, T]`. With one, k and v are
    written at `slots` (default `[lengths, lengths + T)`) and q attends over the cache under
    `mask [B, T, S]` (`cache_mask`: sliding window included): by XLA's einsums, or by the CPU
    kernel (`kernel`, reading the slots below `limit`, `visible_limit`); `block_mask` (no window,
    no explicit slots) takes split-prefix attention instead, through Pallas's kernel when
    `cfg.attention == "flash"`. `compact` (M flat indices into the `block_shape` = (B, T) block):
    q, k, v are `[1, M, ...]`, attention runs on the `[B, T]` layout and returns `[1, M, HqDh]`.
    """
    if compact is not None:
        q, k, v = (scatter_block(y, compact, *block_shape) for y in (q, k, v))
    if cache is None:
        attn = attend(q, k, v, mask, cfg)
    else:
        cache = cache.write(layer, k, v, slots)
        if block_mask is not None:
            attn = attend_split(q, k, v, cache, layer, block_mask, cfg, flash=cfg.attention == "flash")
        else:
            attn = attend_cache(q, cache, layer, mask, cfg, kernel=kernel, limit=limit)
    if compact is not None:
        attn = attn.reshape((-1, attn.shape[-1]))[compact][None]
    return attn, cache


def finish(lp, cfg: ModelConfig, h: Float[Array, "B T D"], attn: Float[Array, "B T HqDh"]):
    """The layer after attention: output projection and residual onto `h`, then the SwiGLU MLP
    and residual (same shape and dtype as `h`)."""
    h = h + dense(attn.astype(h.dtype), lp["wo"]).astype(h.dtype)
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    gate, up = split_gate_up(cfg, dense(x, lp["w_gate_up"]).astype(h.dtype))
    return h + dense(jax.nn.silu(gate) * up, lp["w_down"]).astype(h.dtype)


def layer(lp, cfg: ModelConfig, h: Float[Array, "B T Din"], positions: Rope, mask: Bool[Array, "B T S"],
          cache: KVCache | None = None, index: int | Int[Array, ""] = 0, *, norm: Norm = "input_norm",
          resid: Float[Array, "B T D"] | None = None, **attn_kw,
          ) -> tuple[Float[Array, "B T D"], KVCache | None]:  # fmt: skip
    """One decoder layer over the block `h`: `qkv` (`norm`, `positions` as there), `attention`
    (into layer `index` of `cache`; `attn_kw`: its `slots`, `kernel`, `limit`, `block_mask`,
    `compact`, `block_shape`), `finish` onto `resid` (default `h`: its width is then D).
    Returns the layer's output [B, T, D] (`[1, M, D]` with `compact`) and the cache."""
    q, k, v = qkv(lp, cfg, h, positions, norm=norm)
    attn, cache = attention(q, k, v, cfg, mask, cache, index, **attn_kw)
    return finish(lp, cfg, h if resid is None else resid, attn), cache

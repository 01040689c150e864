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
Each layer is `specdec.models.decoder.layer`, the one decoder layer the draft stacks share.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from specdec.attention import KERNEL_MAX_BLOCK, cache_mask, visible_limit
from specdec.cache import KVCache
from specdec.matmul import choose_layout, dense, layout_of, pack_params
from specdec.models import decoder
from specdec.models.config import ModelConfig
from specdec.models.decoder import rms_norm, scatter_block, split_gate_up, split_qkv  # noqa: F401  (re-exported)
from specdec.models.rope import rope_tables
from specdec.prefill import prefill_blocks

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
    final: bool = True,
) -> tuple[Float[Array, "B K V"] | None, tuple[Float[Array, "B T D"], ...], KVCache | None]:
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
    `final=False` stops after the last layer: no final norm, no logits (None), and tap L is the
    last layer's output (a drafter with heads of its own on the layers: `specdec.drafters.s2d`).
    """
    block_shape = tokens.shape
    if compact is not None:
        if logits_idx is not None:
            raise ValueError("forward: compact and logits_idx cannot be combined")
        h = params["embed"][tokens.reshape(-1)[compact]][None]  # [1, M, D]
        rope = rope_tables(cfg, positions.reshape(-1)[compact][None])
    else:
        h = params["embed"][tokens]
        rope = rope_tables(cfg, positions)
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

    def layer(lp, h, c, i):
        # The shared decoder layer (its input norm is the target's `attn_norm`); with `compact` the
        # projections and the MLP run on the M tokens, attention on the [B, T] layout.
        return decoder.layer(lp, cfg, h, rope, mask, c, i, norm="attn_norm", slots=slots,
                             kernel=kernel, limit=limit, block_mask=bm, compact=compact,
                             block_shape=block_shape)  # fmt: skip

    n = cfg.num_layers
    tapped: dict[int, Array] = {}
    if cfg.scan_layers:

        def body(carry, xs):
            h, c = carry
            lp, i = xs
            h_in = h
            h, c = layer(lp, h, c, i)
            return (h, c), h_in

        (h, cache), stream = jax.lax.scan(body, (h, cache), (params["layers"], jnp.arange(n)))
        tapped = {i: stream[i] for i in taps if i < n}
    else:
        for i, lp in enumerate(params["layers"]):
            if i in taps:
                tapped[i] = h
            h, cache = layer(lp, h, cache, i)
    if not final:
        tapped[n] = h
        out = tuple(tapped[i] for i in taps)
        if compact is not None:
            out = tuple(scatter_block(x, compact, *block_shape) for x in out)
        return None, out, cache
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


def prefill(
    params: Params,
    cfg: ModelConfig,
    prompt: Int[Array, "B T"],
    cache: KVCache,
    *,
    taps: tuple[int, ...] = (),
    last: Int[Array, "B K"] | None = None,
    chunk: int | None | str = "auto",
) -> tuple[Float[Array, "B K V"] | None, tuple[Float[Array, "B T D"], ...], KVCache]:
    """`forward` over a prompt at positions `lengths + [0, T)` (`[0, T)` in a fresh cache; after the
    shared prefix in a cache over one), in chunks for long prompts (`specdec.prefill`).

    Returns (logits at block positions `last` (None without), the hidden `taps`, the cache with the
    prompt written and `lengths` unchanged)."""
    # + the final normed hidden state when logits at `last` are wanted (kept for all T positions)
    want = (*taps, cfg.num_layers) if last is not None else tuple(taps)

    final = cfg.num_layers in want  # else the final norm is not needed (a drafter's cache-only prefill)

    def run(x, pos, c, mask):
        first = jnp.zeros((x.shape[0], 1), jnp.int32)  # one LM-head row per block; unused, so elided
        _, out, c = forward(params, cfg, x, pos, c, mask, taps=want, logits_idx=first, final=final)
        return out, c

    kernel = layout_of(params["layers"]) == "packed"  # forward's choice of the CPU attention kernel
    out, cache = prefill_blocks(run, prompt, cache, kernel=kernel, chunk=chunk)
    if last is None:
        return None, out, cache
    return lm_head(params, jnp.take_along_axis(out[-1], last[..., None], axis=1)), out[:-1], cache


def lm_head(params: Params, h: Float[Array, "... D"]) -> Float[Array, "... V"]:
    """Project normed hidden states to float32 vocabulary logits (tied or untied head)."""
    if "lm_head" in params:
        return dense(h, params["lm_head"])
    return jnp.einsum("...d,vd->...v", h, params["embed"], preferred_element_type=jnp.float32)

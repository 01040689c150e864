"""Decoder-layer building blocks shared by draft stacks (DFlash, Amphista): the target's own layer
form (`models/llama.py`: pre-norm, GQA attention with RoPE, SwiGLU MLP), split so that a drafter
can choose where keys/values come from (its own block, injected target features, a cache).

A layer's params: `input_norm [D]`, `wqkv [Din, (Hq + 2 Hkv) Dh]`, `wo [Hq Dh, D]`, `mlp_norm [D]`,
`w_gate_up [D, 2 I]`, `w_down [I, D]`, optional `q_norm`, `k_norm [Dh]` (Qwen3); dense weights plain
or packed (`specdec.matmul`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from specdec.matmul import dense
from specdec.models.config import ModelConfig
from specdec.models.llama import rms_norm, split_gate_up, split_qkv
from specdec.models.rope import apply_rope, rope_tables


def init_layer(key, cfg: ModelConfig, din: int | None = None) -> dict:
    """Random layer params (output projections scaled by 0.1: a new layer starts near identity)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    din = din or d
    nq = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    k = jax.random.split(key, 4)
    w = lambda k, a, b: jax.random.normal(k, (a, b), jnp.float32) * (a**-0.5)  # noqa: E731
    return {"input_norm": jnp.ones((din,)), "wqkv": w(k[0], din, nq),
            "wo": w(k[1], cfg.num_heads * cfg.head_dim, d) * 0.1, "mlp_norm": jnp.ones((d,)),
            "w_gate_up": w(k[2], d, 2 * i), "w_down": w(k[3], i, d) * 0.1}  # fmt: skip


def qkv(lp, cfg: ModelConfig, h: Float[Array, "B T Din"], positions: Int[Array, "B T"], *, norm: bool = True):
    """RoPE'd q, k and v of `h` (input-normed first unless `norm=False`) at `positions`.

    Layers with `q_norm` / `k_norm [Dh]` (Qwen3's, e.g. DFlash checkpoints) RMS-normalise each head
    of q and k before RoPE."""
    x = rms_norm(h, lp["input_norm"], cfg.rms_norm_eps) if norm else h
    q, k, v = split_qkv(cfg, dense(x, lp["wqkv"]))
    if "q_norm" in lp:
        q, k = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps), rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    cos, sin = rope_tables(cfg, positions)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def kv(lp, cfg: ModelConfig, x: Float[Array, "B T Din"], positions: Int[Array, "B T"]):
    """RoPE'd keys and values of `x` as given (no input norm): injected context features."""
    _, k, v = qkv(lp, cfg, x, positions, norm=False)
    return k, v


def finish(lp, cfg: ModelConfig, h: Float[Array, "B T D"], attn: Float[Array, "B T HD"]):
    """The layer after attention: output projection and residual, then the SwiGLU MLP and residual
    (same shape as `h`)."""
    h = h + dense(attn, lp["wo"])
    gate, up = split_gate_up(cfg, dense(rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps), lp["w_gate_up"]))
    return h + dense(jax.nn.silu(gate) * up, lp["w_down"])

"""Rotary position embeddings (HF "rotate half" convention), with Llama-3 frequency scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from specdec.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[head_dim // 2] inverse frequencies, a host constant derived from the static config."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv.astype(np.float32)
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(
    cfg: ModelConfig, positions: Int[Array, "B T"]
) -> tuple[Float[Array, "B T Dh"], Float[Array, "B T Dh"]]:
    """cos and sin for each position, duplicated over the two halves of the head dimension."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_frequencies(cfg))
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(
    x: Float[Array, "B T H Dh"], cos: Float[Array, "B T Dh"], sin: Float[Array, "B T Dh"]
) -> Float[Array, "B T H Dh"]:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin

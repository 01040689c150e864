"""The device half of self-distillation (`regenerate.py` drives it): the jitted decode step and
row prefill over a continuous batch of conversation slots, and the settings they run under.

Both return the requested hidden taps (float16) and the target's argmax next token at the positions
fed, so the feature cache comes from the generating forwards. Sampling keys are
`fold_in(seed, conversation, position)`: a conversation draws the same tokens whichever slot it
occupies and whenever it runs, so a resumed run writes what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from specdec.cache import KVCache, causal_mask
from specdec.models.config import ModelConfig
from specdec.models.llama import forward
from specdec.sampling import SamplingConfig, argmax, sample


@dataclasses.dataclass(frozen=True)
class RegenConfig:
    """How the target rewrites the data (recorded in the manifest; a resumed run must match)."""

    max_len: int = 512  # tokens per conversation (prompt parts + answers), the KV cache size
    max_new_tokens: int = 256  # per assistant turn
    sampling: SamplingConfig = SamplingConfig()  # greedy; or e.g. temperature 0.8, top_p 0.9
    seed: int = 0
    slots: int = 32  # conversations decoded together
    shard_size: int = 64  # conversations per feature shard
    prefill_tokens: int = 2048  # rows x padded length per prefill call (bounds the logits' memory)


def _row_keys(key, conv: jax.Array, pos: jax.Array):
    return jax.vmap(lambda c, p: jax.random.fold_in(jax.random.fold_in(key, c), p))(conv, pos)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "taps"), donate_argnames=("cache",))
def decode_step(params, cache: KVCache, tokens, active, conv, key, *, cfg: ModelConfig,
                sampling: SamplingConfig, taps: tuple[int, ...]):  # fmt: skip
    """Feed one token per slot (`tokens: [B]`; inactive slots are not advanced).

    Returns (next token [B] sampled at position lengths+1, the target's argmax there [B], the fed
    token's taps [B, n_taps, D] float16, cache).
    """
    b = tokens.shape[0]
    logits, hs, cache = forward(params, cfg, tokens[:, None], cache.lengths[:, None], cache,
                                causal_mask(b, 1), taps=taps)  # fmt: skip
    logits = logits[:, 0]
    cache = cache.advance(active.astype(jnp.int32))
    keys = _row_keys(key, conv, cache.lengths)
    nxt = jax.vmap(lambda k, x: sample(k, x, sampling))(keys, logits)
    return nxt, argmax(logits), jnp.stack(hs, 1)[:, :, 0].astype(jnp.float16), cache


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "taps"), donate_argnames=("cache",))
def prefill_rows(params, cache: KVCache, rows, tokens, n, heads, reset, conv, key, *, cfg: ModelConfig,
                 sampling: SamplingConfig, taps: tuple[int, ...]):  # fmt: skip
    """Append `tokens[i, :n[i]]` to slot `rows[i]` (emptied first where `reset[i]`).

    `rows` may hold the out-of-range index B for padding rows (ignored). `heads: [b, K]` are the
    block positions that need the target's argmax (the last one, n - 1, is sampled from): prompt
    positions predict no training label, and the LM head over every position would be a fifth of
    the prefill's work. Returns (the token sampled after each row's block [b], argmax at `heads`
    [b, K], taps [b, T, n_taps, D] f16, cache).
    """
    b, t = tokens.shape
    lengths = jnp.where(reset, 0, cache.lengths.at[rows].get(mode="clip"))
    sub = KVCache(k=cache.k.at[:, rows].get(mode="clip"), v=cache.v.at[:, rows].get(mode="clip"),
                  lengths=lengths)  # fmt: skip
    pos = lengths[:, None] + jnp.arange(t)[None, :]
    logits, hs, sub = forward(params, cfg, tokens, pos, sub, causal_mask(b, t), taps=taps, logits_idx=heads)
    sub = sub.advance(n)
    keys = _row_keys(key, conv, sub.lengths)
    nxt = jax.vmap(lambda k, x: sample(k, x, sampling))(keys, logits[:, -1])
    cache = KVCache(k=cache.k.at[:, rows].set(sub.k, mode="drop"),
                    v=cache.v.at[:, rows].set(sub.v, mode="drop"),
                    lengths=cache.lengths.at[rows].set(sub.lengths, mode="drop"))  # fmt: skip
    return nxt, argmax(logits), jnp.stack(hs, 2).astype(jnp.float16), cache

"""Chunked prefill: a long prompt runs through the KV cache as fixed-size blocks, one after another.

A prompt block of T tokens attended in one forward builds `[B, H, T, S]` scores over the whole
cache (S >= T): at 8K tokens that is ~2.5 GB per layer and more work than the causal half it needs.
In chunks of C tokens each block sees the chunks before it through the cache: memory is C x S per
layer and, with packed weights (the CPU layout), the CPU attention kernel reads only the filled
prefix, so attention costs the causal T^2 / 2. The chunks run in one `lax.scan` (one compiled
body whatever T).

Every prefill of the loop goes through `prefill_blocks` — the target's, a draft model's, a
feature drafter's draft layer — so all of them take long prompts the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from specdec.attention import KERNEL_MAX_BLOCK
from specdec.cache import KVCache, causal_mask

# Chunk sizes. With the CPU kernel: the longest block it takes (`KERNEL_MAX_BLOCK`) — on
# SmolLM2-135M, a 2-core Xeon, chunks of 128 prefill faster than one block from 256 tokens up
# (0.36 s vs 0.65 s at 256, 3.3 s vs 11.8 s at 2,048; docs/cpu.md "Long prompts"). Through XLA's
# attention (plain weights: accelerators): 1,024, which bounds the scores' memory to C x S.
KERNEL_CHUNK = KERNEL_MAX_BLOCK
XLA_CHUNK = 1024

# run(inputs, positions [B, C], cache, block_mask [B, C, C]) -> (outputs, cache): one block's forward;
# inputs and outputs are pytrees of [B, C, ...] arrays.
BlockFn = Callable[[Any, Int[Array, "B C"], KVCache, Bool[Array, "B C C"]], tuple[Any, KVCache]]


def chunk_for(t: int, kernel: bool) -> int | None:
    """The chunk a prompt block of `t` tokens is prefilled in (None: one block); `kernel`: the
    forward attends through the CPU kernel (packed weights)."""
    chunk = KERNEL_CHUNK if kernel else XLA_CHUNK
    return chunk if t > chunk and t % chunk == 0 else None


def prefill_blocks(run: BlockFn, inputs: Any, cache: KVCache, *, kernel: bool, start: int = 0,
                   chunk: int | None | str = "auto") -> tuple[Any, KVCache]:  # fmt: skip
    """Run `inputs` ([B, T, ...] leaves) through `run` at cache slots `lengths + [0, T)`, causally.

    Token i of the block gets RoPE position `lengths + start + i` (a fresh cache: `start + i`; a
    cache over a shared prefix: right after it); the cache comes back with the whole block
    written and `lengths` unchanged (the caller advances it, as after one `forward`). `chunk`:
    "auto" (`chunk_for` with `kernel`), None (one block) or a size dividing T. The outputs equal
    one block's up to float rounding (attention sums in another order)."""
    b, t = jax.tree.leaves(inputs)[0].shape[:2]
    chunk = chunk_for(t, kernel) if chunk == "auto" else chunk
    base = cache.lengths
    if chunk is None or chunk >= t:
        return run(inputs, base[:, None] + start + jnp.arange(t)[None, :], cache, causal_mask(b, t))
    if t % chunk:
        raise ValueError(f"prefill_blocks: a chunk of {chunk} does not divide the {t}-token block")
    n = t // chunk
    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # [n, B, C, ...]

    def body(cache, xs):
        i, x = xs
        first = i * chunk
        pos = base[:, None] + start + first + jnp.arange(chunk)[None, :]
        out, cache = run(x, pos, cache.replace(lengths=base + first), causal_mask(b, chunk))
        return cache, out

    cache, outs = jax.lax.scan(body, cache, (jnp.arange(n), jax.tree.map(split, inputs)))
    merge = lambda y: jnp.moveaxis(y, 0, 1).reshape(b, t, *y.shape[3:])
    return jax.tree.map(merge, outs), cache.replace(lengths=base)

"""The decode loop: prefill, then `lax.while_loop` over steps, entirely on device.

A step feeds each row's last token (not yet in the cache) through the target, samples the next
token, appends it to the row's output buffer and marks rows done at EOS or `max_new_tokens`.
Rows advance independently (per-row cache lengths, output counts and done flags). The same step
function runs in a host Python loop with `loop="python"` for debugging (wrap in
`jax.disable_jit()` to print inside it).

Shapes are bucketed so new prompts do not recompile: the prompt block is padded to a power of two
(>= 16), the output buffer likewise; the cache holds both.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from specdec.cache import KVCache, causal_mask
from specdec.models.config import ModelConfig
from specdec.models.llama import Params, forward
from specdec.sampling import SamplingConfig, sample


class PromptTooLongError(ValueError):
    """A prompt (plus the tokens to generate) does not fit the model context or the cache."""


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    last: Int[Array, " B"]  # each row's newest token; its KV is not in the cache yet
    out: Int[Array, "B M"]  # generated tokens, row b valid in [0, n_out[b])
    n_out: Int[Array, " B"]
    done: Bool[Array, " B"]
    key: PRNGKeyArray
    steps: Int[Array, ""]  # target forwards after prefill


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    tokens: list[list[int]]  # new tokens per row, EOS included when it was produced
    steps: int  # decode-loop target forwards (prefill excluded)
    finished: list[bool]  # row stopped at EOS (False: stopped at max_new_tokens)


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum): the padded size that keeps compiled shapes few."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _append(state: DecodeState, tok: Int[Array, " B"], eos_ids, max_new) -> DecodeState:
    """Append one token to every row that is still running; update done flags."""
    b, m = state.out.shape
    slot = jnp.where(state.done, m, state.n_out)  # finished rows write out of range: dropped
    out = state.out.at[jnp.arange(b), slot].set(tok, mode="drop")
    n_out = state.n_out + (~state.done).astype(jnp.int32)
    done = state.done | jnp.isin(tok, eos_ids) | (n_out >= max_new)
    last = jnp.where(state.done, state.last, tok)
    return state.replace(out=out, n_out=n_out, done=done, last=last)


def _prefill(params, tokens, prompt_lens, key, eos_ids, max_new, *, cfg, sampling, out_size, cache_size):
    b, t = tokens.shape
    cache = KVCache.init(cfg, b, cache_size)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, _, cache = forward(
        params, cfg, tokens, positions, cache, causal_mask(b, t), logits_idx=(prompt_lens - 1)[:, None]
    )
    key, sub = jax.random.split(key)
    state = DecodeState(
        cache=cache.advance(prompt_lens),
        last=jnp.zeros((b,), jnp.int32),
        out=jnp.zeros((b, out_size), jnp.int32),
        n_out=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        key=key,
        steps=jnp.zeros((), jnp.int32),
    )
    return _append(state, sample(sub, logits[:, 0], sampling), eos_ids, max_new)


def _step(params, state: DecodeState, eos_ids, max_new, *, cfg, sampling) -> DecodeState:
    """One AR step for every row (finished rows compute too, but change nothing)."""
    b = state.last.shape[0]
    tokens = state.last[:, None]
    positions = state.cache.lengths[:, None]
    logits, _, cache = forward(params, cfg, tokens, positions, state.cache, causal_mask(b, 1))
    key, sub = jax.random.split(state.key)
    state = state.replace(cache=cache.advance(1), key=key, steps=state.steps + 1)
    return _append(state, sample(sub, logits[:, 0], sampling), eos_ids, max_new)


def _running(state: DecodeState, max_new) -> Bool[Array, ""]:
    return ~jnp.all(state.done) & (state.steps < max_new)


def _loop(params, state, eos_ids, max_new, *, cfg, sampling):
    body = functools.partial(_step, params, eos_ids=eos_ids, max_new=max_new, cfg=cfg, sampling=sampling)
    return jax.lax.while_loop(lambda s: _running(s, max_new), body, state)


_STATIC = ("cfg", "sampling")
prefill_jit = jax.jit(_prefill, static_argnames=_STATIC + ("out_size", "cache_size"))
loop_jit = jax.jit(_loop, static_argnames=_STATIC, donate_argnames=("state",))
step_jit = jax.jit(_step, static_argnames=_STATIC, donate_argnames=("state",))


def pad_prompts(
    prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int, cache_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Right-pad prompts to a bucketed block; choose the output buffer and cache sizes.

    Returns (tokens [B, T], lengths [B], out_size, cache_size). Raises PromptTooLongError when a
    prompt plus `max_new_tokens` exceeds the model context or an explicit `cache_size`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (got an empty prompt or no prompts)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lens = np.array([len(p) for p in prompts], np.int32)
    longest = int(lens.max())
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise PromptTooLongError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {cfg.max_position_embeddings} tokens; shorten the prompt or lower max_new_tokens"
        )
    t, out_size = bucket(longest), bucket(max_new_tokens)
    needed = t + out_size + 1
    if cache_size is None:
        cache_size = needed
    elif cache_size < longest + max_new_tokens + 1:
        raise PromptTooLongError(
            f"cache_size={cache_size} cannot hold a prompt of {longest} tokens plus "
            f"max_new_tokens={max_new_tokens}; use cache_size >= {longest + max_new_tokens + 1} or a "
            "shorter prompt"
        )
    cache_size = max(cache_size, needed)  # the padded prompt block is written whole
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lens, out_size, cache_size


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_ids: Sequence[int] | None = None,
    seed: int = 0,
    loop: str = "device",
    cache_size: int | None = None,
) -> GenerateOutput:
    """Autoregressive generation for a batch of prompts of different lengths.

    `params` are device params (`specdec.models.to_device`). `eos_ids` defaults to the model's.
    `loop`: "device" (one `lax.while_loop`) or "python" (host loop over the same jitted step).
    """
    return _run(
        params, cfg, prompts, max_new_tokens, max_new_tokens, sampling, eos_ids, seed, loop, cache_size
    )


def warmup(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    loop: str = "device",
) -> None:
    """Compile everything `generate` with these arguments would, running a single step."""
    _run(params, cfg, prompts, max_new_tokens, 1, sampling, None, 0, loop, None)


def _run(params, cfg, prompts, max_new_tokens, limit, sampling, eos_ids, seed, loop, cache_size):
    if loop not in ("device", "python"):
        raise ValueError(f"loop must be 'device' or 'python', got {loop!r}")
    tokens, lens, out_size, cache_size = pad_prompts(prompts, cfg, max_new_tokens, cache_size)
    eos = jnp.asarray(list(cfg.eos_token_ids if eos_ids is None else eos_ids) or [-1], jnp.int32)
    max_new = jnp.int32(limit)  # traced: a 1-token warm-up compiles the same programs
    static = dict(cfg=cfg, sampling=sampling)
    state = prefill_jit(
        params, jnp.asarray(tokens), jnp.asarray(lens), jax.random.key(seed), eos, max_new,
        out_size=out_size, cache_size=cache_size, **static,
    )  # fmt: skip
    if loop == "device":
        state = loop_jit(params, state, eos, max_new, **static)
    else:
        while bool(_running(state, max_new)):
            state = step_jit(params, state, eos, max_new, **static)
    out, n_out = np.asarray(state.out), np.asarray(state.n_out)
    rows = [out[i, : n_out[i]].tolist() for i in range(len(prompts))]
    eos_set = set(np.asarray(eos).tolist())
    return GenerateOutput(
        tokens=rows,
        steps=int(state.steps),
        finished=[bool(r) and r[-1] in eos_set for r in rows],
    )

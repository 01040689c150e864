"""The decode loop — AR and speculative — as one `lax.while_loop` on device.

A step, for every row at once (rows accept different numbers of tokens):

    tree    = builder(drafter, ...)            # root = the row's newest token (not yet in the cache)
    logits  = target forward over the tree block (cache prefix + ancestor mask)
    verdict = verifier(tree, logits)           # accepted path + one bonus/corrected token
    commit the accepted path's KV, append its tokens, update the drafter

Autoregressive decoding is the same loop with no drafter: the tree is the root alone and the
"verifier" samples the target's next token, so the baseline runs the same kernels. The same step
runs in a host Python loop with `loop="python"` for debugging (wrap in `jax.disable_jit()` to
print inside it). The host driver, with shape bucketing, is `specdec.generate`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from specdec.cache import KVCache, causal_mask
from specdec.drafters.protocol import Context
from specdec.models.config import ModelConfig
from specdec.models.llama import forward
from specdec.sampling import SamplingConfig, sample
from specdec.sharding import constrain_state
from specdec.tree import Tree, ancestor_mask, positions
from specdec.trees.budget import lag_priority, prune
from specdec.verifiers.protocol import Verdict


@flax.struct.dataclass
class DecodeState:
    cache: KVCache  # target KV; lengths[b] = committed tokens before the root
    draft: Any  # drafter state (None without a drafter)
    tokens: Int[Array, "B S"]  # prompt + generated tokens; tokens[b, length[b] - 1] is the root
    length: Int[Array, " B"]  # valid tokens in `tokens`, root included
    prompt_lens: Int[Array, " B"]
    done: Bool[Array, " B"]
    key: PRNGKeyArray
    steps: Int[Array, ""]  # loop iterations = target forwards after prefill
    row_steps: Int[Array, " B"]  # target forwards while the row was running
    accepted_hist: Int[Array, " D2"]  # row-steps by tokens emitted (index 1..max_depth+1)

    @property
    def ctx(self) -> Context:
        return Context(tokens=self.tokens, lengths=self.length)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static recipe of a decode (hashable: the jitted loop is specialised on it)."""

    cfg: ModelConfig
    sampling: SamplingConfig
    drafter: Any = None  # None = autoregressive decoding
    builder: Any = None  # a TreeBuilder (specdec.trees)
    verifier: Any = None  # a Verifier (specdec.verifiers)
    mesh: Any = None  # a jax Mesh (specdec.sharding): the state is pinned to its layout every step

    @property
    def max_depth(self) -> int:
        return 0 if self.drafter is None else self.builder.max_depth

    @property
    def taps(self) -> tuple[int, ...]:
        return () if self.drafter is None else tuple(self.drafter.taps)


def emit(state: DecodeState, new: Int[Array, "B K"], count: Int[Array, " B"], eos_ids, max_new):
    """Append `new[b, :count[b]]` to each running row, stopping after EOS or at max_new."""
    b, k = new.shape
    j = jnp.arange(k)[None, :]
    is_eos = jnp.isin(new, eos_ids) & (j < count[:, None])
    first_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1) + 1, k + 1)
    room = max_new - (state.length - state.prompt_lens)
    count = jnp.where(state.done, 0, jnp.minimum(jnp.minimum(count, first_eos), room))
    slot = jnp.where(j < count[:, None], state.length[:, None] + j, state.tokens.shape[1])  # else drop
    tokens = state.tokens.at[jnp.arange(b)[:, None], slot].set(new, mode="drop")
    length = state.length + count
    done = state.done | (first_eos <= count) | (length - state.prompt_lens >= max_new)
    return state.replace(tokens=tokens, length=length, done=done), count


def _prefill(params, dparams, prompt, prompt_lens, key, eos_ids, max_new, *, spec: Spec, cache_size: int):
    b, t = prompt.shape
    cfg = spec.cfg
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    last = (prompt_lens - 1)[:, None]
    logits, taps, cache = forward(
        params, cfg, prompt, pos, KVCache.init(cfg, b, cache_size), causal_mask(b, t),
        taps=spec.taps, logits_idx=last,
    )  # fmt: skip
    key, sub = jax.random.split(key)
    tokens = jnp.zeros((b, cache_size), jnp.int32).at[:, :t].set(prompt)
    state = DecodeState(
        cache=cache.advance(prompt_lens),
        draft=None,
        tokens=tokens,
        length=prompt_lens,
        prompt_lens=prompt_lens,
        done=jnp.zeros((b,), bool),
        key=key,
        steps=jnp.zeros((), jnp.int32),
        row_steps=jnp.zeros((b,), jnp.int32),
        accepted_hist=jnp.zeros((spec.max_depth + 2,), jnp.int32),
    )
    state = constrain_state(state, spec.mesh)
    state, _ = emit(state, sample(sub, logits[:, 0], spec.sampling)[:, None], jnp.ones((b,), jnp.int32),
                     eos_ids, max_new)  # fmt: skip
    if spec.drafter is not None:
        draft = spec.drafter.init(dparams, state.ctx, prompt, taps, cache_size)
        state = state.replace(draft=draft)
    return state


def _step(params, dparams, state: DecodeState, eos_ids, max_new, *, spec: Spec) -> DecodeState:
    """One speculative step (or one AR step without a drafter) for every row.

    A drafter may define `should_draft(params, state, ctx) -> Bool[B]`; when no row wants to draft
    (e.g. n-gram lookup found no match), the step is a plain AR step (a T = 1 forward) instead of
    paying for the whole tree block. Both branches are compiled; `lax.cond` runs one.
    """
    key, k_draft, k_verify = jax.random.split(state.key, 3)
    state = state.replace(key=key)
    root_only = lambda st: _advance(params, dparams, st, Tree.chain(st.ctx.root[:, None]), k_verify, eos_ids,
                                    max_new, spec, speculative=False)  # fmt: skip
    if spec.drafter is None:
        return root_only(state)

    def speculate(st):
        tree, draft = spec.builder(spec.drafter, dparams, st.draft, st.ctx, k_draft, spec.sampling)
        if getattr(spec.builder, "budget", None):  # a batch budget: the laggards' best drafts only
            prio = lag_priority(st.length - st.prompt_lens, max_new, st.done)
            tree = prune(tree, spec.builder.budget, prio)
        return _advance(params, dparams, st.replace(draft=draft), tree, k_verify, eos_ids, max_new, spec,
                        speculative=True)  # fmt: skip

    if not hasattr(spec.drafter, "should_draft") or not getattr(spec.drafter, "adaptive", True):
        return speculate(state)
    wanted = spec.drafter.should_draft(dparams, state.draft, state.ctx) & ~state.done
    return jax.lax.cond(jnp.any(wanted), speculate, root_only, state)


def _advance(params, dparams, state: DecodeState, tree: Tree, k_verify, eos_ids, max_new, spec: Spec, *,
             speculative: bool) -> DecodeState:  # fmt: skip
    """Verify `tree` with one target forward, commit the accepted path, append tokens, update the
    drafter. `speculative=False`: the tree is the root alone and the next token is sampled (AR)."""
    tokens = jnp.where(tree.valid, tree.tokens, 0)  # PAD never reaches the embedding table
    compact = None
    if speculative and getattr(spec.builder, "budget", None):
        # A batch budget (specdec.trees.budget) leaves <= B + budget valid nodes: compute only
        # those (a flattened ragged block). Padding entries repeat node (0, 0), which is harmless.
        size = min(tokens.shape[0] + spec.builder.budget, tokens.size)
        (compact,) = jnp.nonzero(tree.valid.reshape(-1), size=size, fill_value=0)
    logits, taps, cache = forward(
        params, spec.cfg, tokens, positions(tree, state.cache.lengths), state.cache, ancestor_mask(tree),
        taps=spec.taps, compact=compact,
    )  # fmt: skip
    if speculative:
        verdict = spec.verifier(tree, logits, k_verify, spec.sampling)
        cache = cache.commit(verdict.path, verdict.n_accepted + 1)
    else:
        zeros = jnp.zeros(tokens.shape[:1], jnp.int32)
        verdict = Verdict(zeros[:, None], zeros, sample(k_verify, logits[:, 0], spec.sampling))
        cache = cache.advance(1)
    # Tokens emitted this step: the accepted path after the root, then the bonus/correction.
    n = verdict.n_accepted
    along_path = jnp.take_along_axis(tree.tokens, verdict.path, axis=1)  # [B, D+1]
    new = jnp.concatenate([along_path[:, 1:], verdict.next_token[:, None]], axis=1)
    new = jnp.where(jnp.arange(new.shape[1])[None, :] == n[:, None], verdict.next_token[:, None], new)
    running = ~state.done
    state = state.replace(cache=cache, steps=state.steps + 1, row_steps=state.row_steps + running)
    state, count = emit(state, new, n + 1, eos_ids, max_new)
    state = state.replace(accepted_hist=state.accepted_hist.at[count].add(running.astype(jnp.int32)))
    if spec.drafter is not None:
        state = state.replace(draft=spec.drafter.update(dparams, state.draft, state.ctx, tree, verdict, taps))
    return constrain_state(state, spec.mesh)


def _running(state: DecodeState, stop) -> Bool[Array, ""]:
    return ~jnp.all(state.done) & (state.steps < stop)


def _loop(params, dparams, state, eos_ids, max_new, stop, *, spec: Spec):
    body = functools.partial(_step, params, dparams, eos_ids=eos_ids, max_new=max_new, spec=spec)
    return jax.lax.while_loop(lambda s: _running(s, stop), body, state)


prefill_jit = jax.jit(_prefill, static_argnames=("spec", "cache_size"))
loop_jit = jax.jit(_loop, static_argnames=("spec",), donate_argnames=("state",))
step_jit = jax.jit(_step, static_argnames=("spec",), donate_argnames=("state",))

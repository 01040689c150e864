"""The decode loop — AR and speculative — as one `lax.while_loop` on device.

A step, for every row at once (rows accept different numbers of tokens):

    tree    = builder(drafter, ...)            # root = the row's newest token (not yet in the cache)
    logits  = target forward over the tree block (cache prefix + ancestor mask)
    verdict = verifier(tree, logits)           # accepted path + one bonus/corrected token
    commit the accepted path's KV, append its tokens, update the drafter

Autoregressive decoding is the same loop with no drafter: the tree is the root alone and the
"verifier" samples the target's next token, so the baseline runs the same kernels. Rows that have
finished (EOS or the token budget) are frozen: static shapes still carry them through the step,
but they commit no KV and append no tokens. The same step runs in a host Python loop with
`loop="python"` (inspect the state between steps; wrap in `jax.disable_jit()` to run it op by op).
`Spec.check` runs the invariants of `specdec.invariants` every step and stops at the first broken
one (step and row recorded); `Spec.trace` records every step's tree and verdict
(`specdec.trace`). The host driver, with shape bucketing, is `specdec.generate`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from specdec import builder as builder_contract
from specdec import drafter as drafter_contract
from specdec import invariants
from specdec.budget import lag_priority, prune
from specdec.cache import KVCache
from specdec.context import Context
from specdec.models.config import ModelConfig
from specdec.models.llama import forward, prefill
from specdec.prefix_sharing import SharedPrompt, prefill_shared
from specdec.sampling import SamplingConfig, sample
from specdec.sharding import constrain_state
from specdec.trace import StepRecords, record
from specdec.tree import Tree, ancestor_mask, positions
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
    error: Int[Array, " 3"]  # (step, row, code) of the first broken invariant; code 0 = none
    draft_calls: Int[Array, ""]  # drafter calls (begin + expands) summed over steps
    verify_width: Int[Array, ""]  # verification block widths (tokens per row) summed over steps
    records: StepRecords | None = None  # per-step trees and verdicts (`Spec.trace`)

    @property
    def ctx(self) -> Context:
        return Context(tokens=self.tokens, lengths=self.length)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static recipe of a decode (hashable: the jitted loop is specialised on it). Build it with
    `specdec.compose.make_spec`, which validates the composition."""

    cfg: ModelConfig
    sampling: SamplingConfig
    drafter: Any = None  # None = autoregressive decoding
    builder: Any = None  # a TreeBuilder (specdec.builder)
    verifier: Any = None  # a Verifier (specdec.verifiers)
    mesh: Any = None  # a jax Mesh (specdec.sharding): the state is pinned to its layout every step
    check: bool = False  # run the tree and loop invariants every step (specdec.invariants)
    trace: bool = False  # record every step's tree and verdict (specdec.trace)

    @property
    def max_depth(self) -> int:
        return 0 if self.drafter is None else self.builder.max_depth

    @property
    def num_nodes(self) -> int:
        return 1 if self.drafter is None else self.builder.num_nodes

    @property
    def window(self) -> int:
        """Node slots a drafter may write while building a tree (its per-node state's size)."""
        return 1 if self.drafter is None else max(self.builder.window, self.builder.num_nodes)

    @property
    def cache_window(self) -> int:
        """Cache slots kept free past the committed tokens: the window plus a committed path."""
        return 1 if self.drafter is None else self.window + self.max_depth + 1

    @property
    def taps(self) -> tuple[int, ...]:
        return () if self.drafter is None else tuple(self.drafter.taps)

    @property
    def budget(self) -> int | None:
        return None if self.drafter is None else builder_contract.option(self.builder, "budget")

    @property
    def widths(self) -> tuple[int, ...] | None:
        """Compiled verification widths (`TreeBuilder.widths`); None = always the whole tree."""
        if self.drafter is None or self.budget:
            return None
        return builder_contract.option(self.builder, "widths")


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


def _prefill(params, dparams, prompt, prompt_lens, key, eos_ids, max_new, shared: SharedPrompt | None = None,
             *, spec: Spec, cache_size: int, trace_steps: int = 0):  # fmt: skip
    """Prefill the prompts (through their shared prefixes once per group with `shared`,
    `specdec.prefix_sharing`), sample each row's first token, start the drafter."""
    b, t = prompt.shape
    cfg = spec.cfg
    if shared is None:
        logits, taps, cache = prefill(params, cfg, prompt, KVCache.init(cfg, b, cache_size), taps=spec.taps,
                                      last=(prompt_lens - 1)[:, None])  # fmt: skip
    else:
        logits, taps, cache = prefill_shared(params, cfg, shared, t, taps=spec.taps)
    key, sub = jax.random.split(key)
    tokens = jnp.zeros((b, cache_size), jnp.int32).at[:, :t].set(prompt)
    state = DecodeState(
        cache=cache.replace(lengths=prompt_lens),
        draft=None,
        tokens=tokens,
        length=prompt_lens,
        prompt_lens=prompt_lens,
        done=jnp.zeros((b,), bool),
        key=key,
        steps=jnp.zeros((), jnp.int32),
        row_steps=jnp.zeros((b,), jnp.int32),
        accepted_hist=jnp.zeros((spec.max_depth + 2,), jnp.int32),
        error=jnp.zeros((3,), jnp.int32),
        draft_calls=jnp.zeros((), jnp.int32),
        verify_width=jnp.zeros((), jnp.int32),
        records=StepRecords.empty(trace_steps, b, spec.num_nodes, spec.max_depth) if spec.trace else None,
    )
    state = constrain_state(state, spec.mesh)
    state, _ = emit(state, sample(sub, logits[:, 0], spec.sampling)[:, None], jnp.ones((b,), jnp.int32),
                     eos_ids, max_new)  # fmt: skip
    if spec.drafter is not None:
        draft = spec.drafter.init(dparams, state.ctx, prompt, taps, cache_size, window=spec.window)
        state = state.replace(draft=draft)
    return state


def _step(params, dparams, state: DecodeState, eos_ids, max_new, *, spec: Spec) -> DecodeState:
    """One speculative step (or one AR step without a drafter) for every row.

    An adaptive drafter (`specdec.drafter`: `adaptive`, `should_draft`) is asked first; when no
    running row wants to draft (e.g. n-gram lookup found no match), the step is a plain AR step (a
    T = 1 forward) instead of paying for the whole tree block. Both branches are compiled;
    `lax.cond` runs one.
    """
    key, k_draft, k_verify = jax.random.split(state.key, 3)
    state = state.replace(key=key)
    root_only = lambda st: _advance(params, dparams, st, Tree.chain(st.ctx.root[:, None]), k_verify, eos_ids,
                                    max_new, spec, speculative=False)  # fmt: skip
    if spec.drafter is None:
        return root_only(state)

    def speculate(st):
        ctx = st.ctx.replace(running=~st.done)  # finished rows: a builder may skip their drafting
        tree, draft = spec.builder(spec.drafter, dparams, st.draft, ctx, k_draft, spec.sampling)
        if spec.budget:  # a batch budget: the laggards' best drafts only
            prio = lag_priority(st.length - st.prompt_lens, max_new, st.done)
            tree = prune(tree, spec.budget, prio)
        return _advance(params, dparams, st.replace(draft=draft), tree, k_verify, eos_ids, max_new, spec,
                        speculative=True)  # fmt: skip

    if not drafter_contract.option(spec.drafter, "adaptive"):
        return speculate(state)
    wanted = spec.drafter.should_draft(dparams, state.draft, state.ctx) & ~state.done
    return jax.lax.cond(jnp.any(wanted), speculate, root_only, state)


def _advance(params, dparams, state: DecodeState, tree: Tree, k_verify, eos_ids, max_new, spec: Spec, *,
             speculative: bool) -> DecodeState:  # fmt: skip
    """Verify `tree` with one target forward, commit the accepted path of running rows, append their
    tokens, update the drafter. `speculative=False`: the tree is the root alone and the next token
    is sampled (AR)."""
    before = state
    running = ~state.done
    tokens = jnp.where(tree.valid, tree.tokens, 0)  # PAD never reaches the embedding table
    compact = None
    if speculative and spec.budget:
        # A batch budget (specdec.budget) leaves <= B + budget valid nodes: compute only those (a
        # flattened ragged block). Padding entries repeat node (0, 0), which is harmless.
        size = min(tokens.shape[0] + spec.budget, tokens.size)
        (compact,) = jnp.nonzero(tree.valid.reshape(-1), size=size, fill_value=0)
    if speculative and spec.widths:
        logits, taps, cache, width = _bucketed_forward(params, state, tree, tokens, running, spec)
    else:
        logits, taps, cache = forward(
            params, spec.cfg, tokens, positions(tree, state.cache.lengths), state.cache, ancestor_mask(tree),
            taps=spec.taps, compact=compact,
        )  # fmt: skip
        width = tokens.shape[1]
    calls = 0 if not speculative else (tree.draft_calls if tree.draft_calls is not None else spec.max_depth)
    state = state.replace(draft_calls=state.draft_calls + calls, verify_width=state.verify_width + width)
    if speculative:
        verdict = spec.verifier(tree, logits, k_verify, spec.sampling)
        cache = cache.commit(verdict.path, jnp.where(running, verdict.n_accepted + 1, 0))
    else:
        zeros = jnp.zeros(tokens.shape[:1], jnp.int32)
        verdict = Verdict(zeros[:, None], zeros, sample(k_verify, logits[:, 0], spec.sampling))
        cache = cache.advance(running.astype(jnp.int32))
    # Tokens emitted this step: the accepted path after the root, then the bonus/correction.
    n = verdict.n_accepted
    along_path = jnp.take_along_axis(tree.tokens, verdict.path, axis=1)  # [B, D+1]
    new = jnp.concatenate([along_path[:, 1:], verdict.next_token[:, None]], axis=1)
    new = jnp.where(jnp.arange(new.shape[1])[None, :] == n[:, None], verdict.next_token[:, None], new)
    state = state.replace(cache=cache, steps=state.steps + 1, row_steps=state.row_steps + running)
    state, count = emit(state, new, n + 1, eos_ids, max_new)
    state = state.replace(accepted_hist=state.accepted_hist.at[count].add(running.astype(jnp.int32)))
    if spec.drafter is not None:
        state = state.replace(draft=spec.drafter.update(dparams, state.draft, state.ctx, tree, verdict, taps))
    if spec.check:
        state = _check(before, state, tree, max_new, spec)
    if spec.trace:
        records = record(state.records, before.steps, tree, verdict, new, count, running,
                         before.cache.lengths, state.cache.lengths)  # fmt: skip
        state = state.replace(records=records)
    return constrain_state(state, spec.mesh)


def _bucketed_forward(params, state: DecodeState, tree: Tree, tokens, running, spec: Spec):
    """The verification forward over the first w slots of the tree, w the smallest of `spec.widths`
    that holds every running row's valid nodes (builders with widths keep valid nodes in front).
    Every width is compiled into the one program (`lax.switch`): no recompiles while decoding.
    Logits and taps past w are zeros (invalid nodes, which no verifier reads)."""
    n = tokens.shape[1]
    last = jnp.max(jnp.where(tree.valid, jnp.arange(n)[None, :], 0), axis=1) + 1
    need = jnp.max(jnp.where(running, last, 1))
    widths = jnp.asarray(spec.widths, jnp.int32)
    branch = jnp.minimum(jnp.searchsorted(widths, need), len(spec.widths) - 1)
    pos, mask = positions(tree, state.cache.lengths), ancestor_mask(tree)

    def width(w: int):
        def run(cache):
            logits, taps, cache = forward(params, spec.cfg, tokens[:, :w], pos[:, :w], cache, mask[:, :w, :w],
                                          taps=spec.taps)  # fmt: skip
            pad = lambda x: jnp.pad(x, ((0, 0), (0, n - w), (0, 0)))
            return pad(logits), tuple(pad(t) for t in taps), cache

        return run

    logits, taps, cache = jax.lax.switch(branch, [width(w) for w in spec.widths], state.cache)
    return logits, taps, cache, widths[branch]


def _check(before: DecodeState, after: DecodeState, tree: Tree, max_new, spec: Spec) -> DecodeState:
    """Record the first broken invariant (`specdec.invariants`) of this step: (step, row, code)."""
    tree_code = invariants.tree_violations(tree, spec.cfg.vocab_size, before.cache.filled, before.cache.size)
    tree_code = jnp.where(before.done, 0, tree_code)  # a finished row's tree is never used
    loop_code = invariants.loop_violations(
        before.done, before.cache.lengths, before.length, after.cache.lengths, after.length,
        after.length - after.prompt_lens, max_new,
    )  # fmt: skip
    code = jnp.where(tree_code > 0, tree_code, loop_code)
    row = jnp.argmax(code > 0)
    found = jnp.stack([before.steps, row.astype(jnp.int32), code[row]])
    return after.replace(error=jnp.where((after.error[2] == 0) & (code[row] > 0), found, after.error))


def _running(state: DecodeState, stop) -> Bool[Array, ""]:
    return ~jnp.all(state.done) & (state.steps < stop) & (state.error[2] == 0)


def _loop(params, dparams, state, eos_ids, max_new, stop, *, spec: Spec):
    body = functools.partial(_step, params, dparams, eos_ids=eos_ids, max_new=max_new, spec=spec)
    return jax.lax.while_loop(lambda s: _running(s, stop), body, state)


prefill_jit = jax.jit(_prefill, static_argnames=("spec", "cache_size", "trace_steps"))
loop_jit = jax.jit(_loop, static_argnames=("spec",), donate_argnames=("state",))
step_jit = jax.jit(_step, static_argnames=("spec",), donate_argnames=("state",))

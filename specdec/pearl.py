"""PEARL (Liu et al., ICLR 2025): parallel speculative decoding with pre-verify and post-verify.

A loop policy beside the standard step of `specdec.decode`: a token-level draft model (a
`DraftModel`: an independent small model or `layer_skip`) drafts γ tokens every round while the
target verifies, and each row switches between two modes on the outcome.

Notation per row: C = the committed tokens, whose last one r (the root) is committed but not in the
target cache (the standard loop's convention); U = u_1..u_{γ-1}, the unverified run that follows r
in POST mode, with the draft laws q(u_j) they were drawn from.

    PRE round    draft: d_1..d_γ after C              target: one forward over [r] -> p_0
                 verify d_1 with min(1, p_0/q_1):  accept -> commit d_1, U <- d_2..d_γ, POST
                                                   reject -> commit t ~ norm((p_0 - q_1)+), PRE
    POST round   draft: e_1..e_γ after C + U          target: one forward over [r, u_1..u_{γ-1}]
                 verify x = (u_1..u_{γ-1}, e_1) against p_0..p_{γ-1}, left to right, n accepted:
                   n = γ  -> commit x_1..x_γ, U <- e_2..e_γ, stay in POST; no bonus token
                   n < γ  -> commit x_1..x_n and t ~ norm((p_n - q_n)+), PRE

Every emitted token passes the standard acceptance test against the target's law given the committed
prefix (T = 0: one-hot laws, so exact matching), so the output follows the target's distribution at
any temperature. The all-accept POST round samples no bonus token: the target block never covers the
position after e_1, and e_2.. (drafted after e_1) stay unverified.

Static shapes: the target block is always γ wide (a PRE row has only its root valid), the draft
always runs γ one-token forwards, and a round emits 1..γ tokens per row through `decode.emit`,
which stops rows at EOS or `max_new` and freezes finished rows. Cache invariants after every round (tested):

    target cache   lengths = |C| - 1, holding C without r                     (committed only)
    draft cache    lengths = |C| - 1 + |U|, holding (C + U) without its last token (the draft root)

so the draft cache runs ahead of the target's by |U| = γ - 1 in POST, 0 in PRE. A rejection rolls
both back for free: only `lengths` move, every kept entry was written by an earlier forward.

The round splits into four pure functions so that the draft and the target can run on different
devices (`specdec.pearl_mesh`): `draft_round` (draft side), `target_forward` and `settle` (target
side: one forward, then the verdict computed once), `receive` (the draft side applies the verdict's
`Message`). The single-device step composes them under one jit and `lax.while_loop`. Randomness is
derived per round by `fold_in(key, round)` on each side, from keys split off the seed: the draft's
decisions never read the target's samples, and both runners make the same choices.

Serialised on one device a round costs the draft's γ steps plus the target's forward and emits at
most γ tokens, so PEARL does not beat standard speculation there; it is the reference the
two-device runner is checked against (docs/pearl.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from specdec.cache import KVCache, causal_mask
from specdec.decode import emit
from specdec.generate import GenerateOutput, pad_prompts  # it imports this module lazily (loop="pearl")
from specdec.models import llama
from specdec.models.config import ModelConfig
from specdec.models.llama import forward
from specdec.sampling import SamplingConfig, argmax, inverse_cdf, probabilities, sample
from specdec.verifiers import walk

PRE, POST = 0, 1

# (x [B, G], q [B, G, V], target logits [B, G, V], m [B], key, sampling) -> (n_accepted [B], t [B])
PearlVerify = Callable[..., tuple[Int[Array, " B"], Int[Array, " B"]]]


def chain_verify(
    x: Int[Array, "B G"],
    q: Float[Array, "B G V"],
    target_logits: Float[Array, "B G V"],
    m: Int[Array, " B"],
    key: PRNGKeyArray,
    sampling: SamplingConfig,
) -> tuple[Int[Array, " B"], Int[Array, " B"]]:
    """Speculative sampling of the first m[b] candidates of a chain, without a bonus token.

    x[:, j] was drawn from q[:, j]; target_logits[:, j] is the target's next-token law before
    x[:, j]. Accept left to right with probability min(1, p/q) (fresh coin per position); n = the
    accepted prefix (<= m). Returns (n, t): t ~ norm((p_n - q_n)+) is the correction, meaningful only
    where n < m (where n = m the caller emits the m candidates and nothing else). At T = 0 p and q are
    one-hot, so this is exact matching and t the target's argmax.
    """
    b, g, _ = target_logits.shape
    coins, emit_u = walk.uniforms(key, b, g)
    p = probabilities(target_logits, sampling)
    take = lambda a: jnp.take_along_axis(a, x[..., None], axis=-1)[..., 0]
    p_x, q_x = take(p), take(q)
    live = jnp.arange(g)[None, :] < m[:, None]
    accepted = live & (p_x > 0) & (coins * q_x < p_x)
    n = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)
    rows, at = jnp.arange(b), jnp.minimum(n, g - 1)
    p_n, q_n = p[rows, at], q[rows, at]
    dist = jax.vmap(walk.safe_norm)(jnp.maximum(p_n - q_n, 0.0), p_n)
    t = jax.vmap(lambda u, d: walk.emit(u, d, sampling))(emit_u, dist)
    return n, t


@dataclasses.dataclass(frozen=True)
class Pearl:
    """The static recipe of a PEARL decode (hashable: the jitted functions specialise on it).

    `drafter` is any `DraftModel`-like object with a `cfg` (a Llama-family model config) whose params
    are passed beside the target's: an independent draft model or `layer_skip`. `verify` is the
    chain verdict (`chain_verify`; its signature is `PearlVerify`).
    """

    cfg: ModelConfig
    drafter: Any
    sampling: SamplingConfig = SamplingConfig()
    gamma: int = 4
    verify: PearlVerify = chain_verify

    def __post_init__(self):
        if not isinstance(self.gamma, int) or isinstance(self.gamma, bool) or self.gamma < 1:
            raise ValueError(f"PEARL needs gamma >= 1 (draft tokens per round), got {self.gamma!r}")
        dcfg = getattr(self.drafter, "cfg", None)
        if not isinstance(dcfg, ModelConfig):
            raise ValueError(
                "PEARL drafts with a token-level draft model (a DraftModel: layer_skip or a small model "
                f"sharing the tokenizer), got {type(self.drafter).__name__}"
            )
        if dcfg.vocab_size != self.cfg.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({dcfg.vocab_size}) differs from the target's "
                f"({self.cfg.vocab_size}); PEARL needs a draft model sharing the target's tokenizer"
            )

    @property
    def dcfg(self) -> ModelConfig:
        return self.drafter.cfg

    @property
    def window(self) -> int:
        """Cache slots needed past the committed tokens: the draft runs |U| <= γ - 1 ahead and
        writes γ more; the target writes a γ-wide block."""
        return 2 * self.gamma


# --------------------------------------------------------------------------------------------- state
@flax.struct.dataclass
class Proposal:
    """Draft -> target, once per round: what the draft side drew this round."""

    tokens: Int[Array, "B G"]  # s_1..s_γ, drawn autoregressively after C + U
    probs: Float[Array, "B G V"]  # q_i: the law s_i was drawn from (after the SamplingConfig)


@flax.struct.dataclass
class Message:
    """Target -> draft, once per round: the verdict as the draft side needs it."""

    root: Int[Array, " B"]  # the next draft root: the last token of C + U (s_γ in POST, r in PRE)
    length: Int[Array, " B"]  # the next draft cache length: |C| - 1 + |U|


@flax.struct.dataclass
class DraftSide:
    """The draft device's state. `cache.lengths[b]` = |C| - 1 + |U| (all of C + U but its last token,
    `root`, which the next round feeds first)."""

    cache: KVCache
    root: Int[Array, " B"]
    key: PRNGKeyArray  # base key of the draft's decisions; round i uses fold_in(key, i)
    rounds: Int[Array, ""]


@flax.struct.dataclass
class TargetSide:
    """The target device's state (the fields `decode.emit` reads and writes, plus PEARL's).

    `tokens[b, :length[b]]` = C (prompt + committed tokens; the last one is the root r);
    `cache.lengths` = length - 1. In POST, `unverified[b]` = U and `unverified_probs[b]` their draft
    laws; in PRE both are stale. `round_tokens[i, b]` = tokens row b emitted in round i (0 when not
    running); `round_mode[i, b]` = its mode at the start of round i (PRE 0, POST 1, -1 not running).
    """

    cache: KVCache
    tokens: Int[Array, "B S"]
    length: Int[Array, " B"]
    prompt_lens: Int[Array, " B"]
    done: Bool[Array, " B"]
    post: Bool[Array, " B"]
    unverified: Int[Array, "B G1"]
    unverified_probs: Float[Array, "B G1 V"]
    key: PRNGKeyArray  # base key of the verdicts; round i uses fold_in(key, i)
    steps: Int[Array, ""]  # rounds (= target forwards after prefill)
    row_steps: Int[Array, " B"]  # rounds while the row was running
    accepted_hist: Int[Array, " G2"]  # row-rounds by tokens emitted (index 0..γ)
    round_tokens: Int[Array, "R B"]
    round_mode: Int[Array, "R B"]

    @property
    def root(self) -> Int[Array, " B"]:
        return jnp.take_along_axis(self.tokens, (self.length - 1)[:, None], axis=1)[:, 0]


@flax.struct.dataclass
class PearlState:
    target: TargetSide
    draft: DraftSide


def _keys(key: PRNGKeyArray):
    """(first token, verdicts, draft) keys, split identically on every device from the seed key."""
    k = jax.random.split(key, 3)
    return k[0], k[1], k[2]


# --------------------------------------------------------------------------------------------- rounds
def prefill_target(pearl: Pearl, params, prompt: Int[Array, "B T"], prompt_lens: Int[Array, " B"], key,
                   eos_ids, max_new, *, cache_size: int, rounds: int
                   ) -> tuple[TargetSide, Message]:  # fmt: skip
    """Target prefill: the prompt's KV, the first token sampled and emitted, every row in PRE.
    `rounds` sizes the per-round records (a decode takes at most max_new - 1 rounds)."""
    b, t = prompt.shape
    g, v = pearl.gamma, pearl.cfg.vocab_size
    logits, _, cache = llama.prefill(params, pearl.cfg, prompt, KVCache.init(pearl.cfg, b, cache_size),
                                     last=(prompt_lens - 1)[:, None])  # fmt: skip
    k_first, k_verify, _ = _keys(key)
    state = TargetSide(
        cache=cache.advance(prompt_lens),
        tokens=jnp.zeros((b, cache_size), jnp.int32).at[:, :t].set(prompt),
        length=prompt_lens,
        prompt_lens=prompt_lens,
        done=jnp.zeros((b,), bool),
        post=jnp.zeros((b,), bool),
        unverified=jnp.zeros((b, g - 1), jnp.int32),
        unverified_probs=jnp.zeros((b, g - 1, v), jnp.float32),
        key=k_verify,
        steps=jnp.zeros((), jnp.int32),
        row_steps=jnp.zeros((b,), jnp.int32),
        accepted_hist=jnp.zeros((g + 1,), jnp.int32),
        round_tokens=jnp.zeros((rounds, b), jnp.int32),
        round_mode=jnp.full((rounds, b), -1, jnp.int32),
    )
    first = sample(k_first, logits[:, 0], pearl.sampling)
    state, _ = emit(state, first[:, None], jnp.ones((b,), jnp.int32), eos_ids, max_new)
    return state, Message(root=state.root, length=state.cache.lengths)


def prefill_draft(pearl: Pearl, dparams, prompt: Int[Array, "B T"], prompt_lens: Int[Array, " B"], key, *,
                  cache_size: int) -> DraftSide:  # fmt: skip
    """Draft prefill: the prompt's KV in the draft cache. The root (the target's first token) arrives
    with the prefill's `Message` (`receive`)."""
    b = prompt.shape[0]
    _, _, cache = llama.prefill(dparams, pearl.dcfg, prompt, KVCache.init(pearl.dcfg, b, cache_size))
    _, _, k_draft = _keys(key)
    return DraftSide(cache=cache.advance(prompt_lens), root=jnp.zeros((b,), jnp.int32), key=k_draft,
                     rounds=jnp.zeros((), jnp.int32))  # fmt: skip


def receive(draft: DraftSide, msg: Message) -> DraftSide:
    """Apply the verdict on the draft side: new root and cache length (a rollback is a length)."""
    return draft.replace(root=msg.root, cache=draft.cache.replace(lengths=msg.length))


def draft_round(pearl: Pearl, dparams, draft: DraftSide) -> tuple[DraftSide, Proposal]:
    """γ one-token draft forwards from the draft root: s_1..s_γ and their laws q_1..q_γ.

    The root and s_1..s_{γ-1} are written at slots lengths..lengths+γ-1; `lengths` itself moves only
    when the verdict arrives (`receive`). s_i = argmax at T = 0, else an inverse-CDF draw from q_i
    with the round's own uniforms (fold_in(key, round)).
    """
    b, g = draft.root.shape[0], pearl.gamma
    u = jax.random.uniform(jax.random.fold_in(draft.key, draft.rounds), (b, g))
    start = draft.cache.lengths

    def body(i, carry):
        cache, tok, toks, probs = carry
        logits, _, cache = forward(dparams, pearl.dcfg, tok[:, None], (start + i)[:, None], cache,
                                   causal_mask(b, 1))  # fmt: skip
        cache = cache.advance(1)
        q = probabilities(logits[:, 0], pearl.sampling)
        nxt = argmax(logits[:, 0]) if pearl.sampling.greedy else inverse_cdf(u[:, i], q)
        return cache, nxt.astype(jnp.int32), toks.at[:, i].set(nxt), probs.at[:, i].set(q)

    init = (draft.cache, draft.root, jnp.zeros((b, g), jnp.int32),
            jnp.zeros((b, g, pearl.dcfg.vocab_size), jnp.float32))  # fmt: skip
    cache, _, toks, probs = jax.lax.fori_loop(0, g, body, init)
    draft = draft.replace(cache=cache.replace(lengths=start), rounds=draft.rounds + 1)
    return draft, Proposal(tokens=toks, probs=probs)


def target_block(target: TargetSide) -> Int[Array, "B G"]:
    """The γ-wide target block: [r, u_1..u_{γ-1}] in POST, [r, 0, ...] in PRE (only r valid)."""
    u = jnp.where(target.post[:, None], target.unverified, 0)
    return jnp.concatenate([target.root[:, None], u], axis=1)


def target_forward(pearl: Pearl, params, target: TargetSide) -> tuple[Float[Array, "B G V"], KVCache]:
    """One target forward over the γ-wide block at slots lengths..lengths+γ-1: (logits [B, γ, V],
    cache with the block written; `lengths` unchanged). A PRE row's columns past the root are
    computed and never read."""
    g = pearl.gamma
    b = target.length.shape[0]
    pos = target.cache.lengths[:, None] + jnp.arange(g)[None, :]
    logits, _, cache = forward(params, pearl.cfg, target_block(target), pos, target.cache, causal_mask(b, g))
    return logits, cache


def settle(pearl: Pearl, target: TargetSide, logits: Float[Array, "B G V"], cache: KVCache, prop: Proposal,
           eos_ids, max_new) -> tuple[TargetSide, Message]:  # fmt: skip
    """The verdict, computed once on the target side: verify, emit, commit, switch modes.

    `cache` is the target cache after `target_forward` (the block written at lengths..; `target.cache`
    is not read, so a runner may pass it donated). Rows that were finished before the round change
    nothing. Returns the new target state and the draft side's `Message`.
    """
    g = pearl.gamma
    b = target.length.shape[0]
    running, post = ~target.done, target.post
    s1, q1 = prop.tokens[:, :1], prop.probs[:, :1]
    x = jnp.where(post[:, None], jnp.concatenate([target.unverified, s1], 1),
                  jnp.concatenate([s1, jnp.zeros((b, g - 1), jnp.int32)], 1))  # fmt: skip
    q = jnp.where(post[:, None, None], jnp.concatenate([target.unverified_probs, q1], 1),
                  jnp.concatenate([q1, jnp.zeros_like(target.unverified_probs)], 1))  # fmt: skip
    m = jnp.where(post, g, 1).astype(jnp.int32)
    n, t = pearl.verify(x, q, logits, m, jax.random.fold_in(target.key, target.steps), pearl.sampling)
    count = jnp.minimum(n + 1, m)
    new = jnp.where(jnp.arange(g)[None, :] == n[:, None], t[:, None], x)  # t follows the accepted prefix
    state, emitted = emit(target, new, count, eos_ids, max_new)  # 0 for finished rows
    post_next = jnp.where(running, n == m, post)
    cache = cache.replace(lengths=cache.lengths + emitted)  # r and the accepted tokens: a chain
    i = target.steps
    keep_u = (running & post_next)[:, None]  # U <- s_2..s_γ where the row is (still) in POST
    state = state.replace(
        cache=cache,
        post=post_next,
        unverified=jnp.where(keep_u, prop.tokens[:, 1:], target.unverified),
        unverified_probs=jnp.where(keep_u[:, None], prop.probs[:, 1:], target.unverified_probs),
        steps=i + jnp.any(running).astype(jnp.int32),  # a round with no running row is no round
        row_steps=target.row_steps + running,
        accepted_hist=target.accepted_hist.at[emitted].add(running.astype(jnp.int32)),
        round_tokens=target.round_tokens.at[i].set(emitted, mode="drop"),
        round_mode=target.round_mode.at[i].set(jnp.where(running, post.astype(jnp.int32), -1), mode="drop"),
    )
    root = jnp.where(post_next, prop.tokens[:, -1], state.root)
    msg = Message(root=root, length=cache.lengths + (g - 1) * post_next.astype(jnp.int32))
    return state, msg


# ------------------------------------------------------------------------------------ one device loop
def prefill(params, dparams, prompt, prompt_lens, key, eos_ids, max_new, *, pearl: Pearl, cache_size: int,
            rounds: int) -> PearlState:  # fmt: skip
    """Both prefills on one device, the draft side already holding the first message."""
    target, msg = prefill_target(pearl, params, prompt, prompt_lens, key, eos_ids, max_new,
                                 cache_size=cache_size, rounds=rounds)  # fmt: skip
    draft = prefill_draft(pearl, dparams, prompt, prompt_lens, key, cache_size=cache_size)
    return PearlState(target=target, draft=receive(draft, msg))


def step(params, dparams, state: PearlState, eos_ids, max_new, *, pearl: Pearl) -> PearlState:
    """One PEARL round for every row, serialised on one device: draft, target forward, verdict."""
    draft, prop = draft_round(pearl, dparams, state.draft)
    logits, cache = target_forward(pearl, params, state.target)
    target, msg = settle(pearl, state.target, logits, cache, prop, eos_ids, max_new)
    return PearlState(target=target, draft=receive(draft, msg))


def running(target: TargetSide, stop) -> Bool[Array, ""]:
    return ~jnp.all(target.done) & (target.steps < stop)


def loop(params, dparams, state: PearlState, eos_ids, max_new, stop, *, pearl: Pearl) -> PearlState:
    """Rounds until every row is finished or `stop` rounds ran: one `lax.while_loop`."""
    body = functools.partial(step, params, dparams, eos_ids=eos_ids, max_new=max_new, pearl=pearl)
    return jax.lax.while_loop(lambda s: running(s.target, stop), body, state)


prefill_jit = jax.jit(prefill, static_argnames=("pearl", "cache_size", "rounds"))
step_jit = jax.jit(step, static_argnames=("pearl",), donate_argnames=("state",))
loop_jit = jax.jit(loop, static_argnames=("pearl",), donate_argnames=("state",))


# -------------------------------------------------------------------------------------- host driver
@dataclasses.dataclass(frozen=True)
class PearlOutput(GenerateOutput):
    """`generate`'s output plus PEARL's per-round records.

    `steps` counts rounds (one target forward each); `accepted_hist[k]` = row-rounds that emitted k
    tokens (k <= γ: no bonus token, so `tau` <= γ); `round_tokens[b]` / `round_modes[b]` = the tokens
    emitted and the mode (PRE 0, POST 1) of each round row b ran, in order.
    """

    gamma: int = 0
    round_tokens: list[list[int]] = dataclasses.field(default_factory=list)
    round_modes: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def acceptance_per_depth(self) -> list[float]:
        """Fraction of row-rounds that emitted at least d tokens, d = 2..γ (every round emits one)."""
        n = sum(self.accepted_hist)
        return [
            sum(self.accepted_hist[d:]) / n if n else float("nan") for d in range(2, len(self.accepted_hist))
        ]


def pearl_generate(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    drafter,
    draft_params,
    gamma: int,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_ids: Sequence[int] | None = None,
    seed: int = 0,
    loop: str = "device",
    cache_size: int | None = None,
    devices: tuple | None = None,
    verify: PearlVerify = chain_verify,
    limit: int | None = None,
) -> PearlOutput:
    """PEARL-decode a batch of prompts of different lengths with a token-level draft model.

    `drafter`, `draft_params`: a `DraftModel` (`specdec.drafters.layer_skip` or a small model) and
    its params; `gamma`: draft tokens per round (`pearl_gamma.profile_gamma` measures a good one). `loop`:
    "device" (one `lax.while_loop`) or "python" (a host loop over the jitted round). `devices` =
    (draft device, target device): the two-device runner of `specdec.pearl_mesh` (draft and target
    rounds dispatched to their devices each round, running concurrently; same tokens as one device).
    `limit` caps the rounds (a warm-up runs one). Raises ValueError on a bad combination.
    """
    pearl = Pearl(cfg, drafter, sampling, gamma, verify)
    if loop not in ("device", "python"):
        raise ValueError(f"loop must be 'device' or 'python', got {loop!r}")
    tokens, lens, cache_size = pad_prompts(prompts, cfg, max_new_tokens, cache_size, pearl.window)
    eos = np.asarray(list(cfg.eos_token_ids if eos_ids is None else eos_ids) or [-1], np.int32)
    rounds = max(max_new_tokens - 1, 1)
    stop = rounds if limit is None else min(limit, rounds)
    key = jax.random.key(seed)
    if devices is not None:
        from specdec.pearl_mesh import run_two_devices

        kw = dict(cache_size=cache_size, rounds=rounds, stop=stop, devices=devices)
        target = run_two_devices(pearl, params, draft_params, tokens, lens, key, eos, max_new_tokens, **kw)
    else:
        eos_d, max_new = jnp.asarray(eos), jnp.int32(max_new_tokens)
        state = prefill_jit(params, draft_params, jnp.asarray(tokens), jnp.asarray(lens), key, eos_d, max_new,
                            pearl=pearl, cache_size=cache_size, rounds=rounds)  # fmt: skip
        if loop == "device":
            state = loop_jit(params, draft_params, state, eos_d, max_new, jnp.int32(stop), pearl=pearl)
        else:
            while bool(running(state.target, stop)):
                state = step_jit(params, draft_params, state, eos_d, max_new, pearl=pearl)
        target = state.target
    return output(target, lens, eos, gamma)


def output(target: TargetSide, lens: np.ndarray, eos: np.ndarray, gamma: int) -> PearlOutput:
    """Fetch a finished target state into a PearlOutput (rows = len(lens))."""
    t = jax.device_get(target)
    n = len(lens)
    rows = [t.tokens[i, lens[i] : t.length[i]].tolist() for i in range(n)]
    eos_set = set(eos.tolist())
    steps = int(t.steps)
    modes, counts = t.round_mode[:steps], t.round_tokens[:steps]
    return PearlOutput(
        tokens=rows,
        finished=[bool(r) and r[-1] in eos_set for r in rows],
        steps=steps,
        row_steps=t.row_steps[:n].tolist(),
        accepted_hist=t.accepted_hist.tolist(),
        # static shapes: every round runs γ one-token draft forwards and a γ-wide target block
        draft_calls=gamma * steps,
        verify_width=gamma * steps,
        gamma=gamma,
        round_tokens=[counts[modes[:, i] >= 0, i].tolist() for i in range(n)],
        round_modes=[modes[modes[:, i] >= 0, i].tolist() for i in range(n)],
    )

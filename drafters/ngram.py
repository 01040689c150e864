"""Prompt lookup / n-gram drafter: match the last n tokens in the context, propose what followed.

Training-free and model-free. For each row, the longest suffix of the committed tokens (n from
`max_n` down to `min_n`) that occurred earlier in the context is found (latest occurrence), and the
`max_depth` tokens that followed it are the proposal. Draft "logits" are one-hot on the proposal
(q is a point mass, so the drafts are deterministic); where there is no match, or a frontier node
is off the proposal, they are uniform (an honest q if a builder samples from it).
`should_draft` lets the decode loop take a plain AR step when no row has a proposal, so a miss
costs one T = 1 forward instead of a whole verification block.
`candidates(ctx, r)` returns up to r proposals from different occurrences (the retrieval side of
fusing retrieval paths into a model drafter's tree); the first is the drafter's own proposal.

Adaptive lengths (`chain:K+adaptive`, `specdec.trees.adaptive`) read `acceptance`: a training-free
estimate of each proposed token's acceptance from the match length n, its depth d in the proposal
and the row's history. Per row, n and d, decayed counts of proposal tokens verified at depth d
(trials: the first d - 1 were accepted) and of those accepted (hits) give â(n, d) = (hits + 1) /
(trials + 2): the conditional acceptance, so a copy that keeps going (a run accepted to depth d is
likely accepted further) earns longer proposals. Only committed history enters it (past verdicts),
never this step's target draws, so the length it picks keeps the loop lossless.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from specdec.context import Context
from specdec.tree import Tree

_OFF = -1e9  # logit of every token but the proposed one: softmax gives an exact one-hot


@flax.struct.dataclass
class NGramState:
    proposal: Int[Array, "B K"]
    ok: Bool[Array, "B K"]  # proposal[b, k] exists
    match_n: Int[Array, " B"]  # length of the matched suffix (0: no match)
    hits: Float[Array, "B M K"]  # decayed accepted proposal tokens, by match length 0..max_n and depth
    trials: Float[Array, "B M K"]  # decayed verified proposal tokens, by match length and depth


@dataclasses.dataclass(frozen=True)
class NGram:
    vocab_size: int
    max_depth: int = 8  # proposal length
    max_n: int = 3
    min_n: int = 1
    adaptive: bool = True  # skip drafting (AR step) when no row has a proposal
    taps: tuple[int, ...] = ()
    decay: float = 0.9  # per-step decay of the acceptance history (adaptive lengths)
    # h for adaptive lengths: the fastest adaptive threshold on MT-Bench (docs/results/adaptive_sweep_t0_*)
    measured_threshold: float | None = 0.9
    paths: int = 2  # candidates `retrieve` returns when fused into a model drafter's tree

    @property
    def fallback(self) -> str:
        """What a row without a match drafts (logged once by the loop: `specdec.drafter`)."""
        skip = (
            "a step where no row has a match runs as a plain AR step"
            if self.adaptive
            else "every step verifies a full tree (adaptive=0)"
        )
        return (
            f"n-gram lookup: a row whose last {self.min_n}..{self.max_n} tokens occurred nowhere earlier "
            f"drafts nothing useful that step (uniform draft logits, verified losslessly); {skip}"
        )

    def threshold(self, sampling) -> float | None:
        """The stop threshold h measured for `acceptance` (the same at every temperature: the
        proposal is deterministic)."""
        return self.measured_threshold

    def acceptance(self, params, state: NGramState, ctx: Context, tree: Tree, nodes, sampling):
        """â of each node's token: the row's acceptance rate for proposals of this match length
        (module doc); 0 for a node off the proposal (it was drafted from a uniform q)."""
        k = self.max_depth
        depth = jnp.take_along_axis(tree.depth, nodes, axis=1)
        tok = jnp.take_along_axis(tree.tokens, nodes, axis=1)
        prop = jnp.take_along_axis(state.proposal, jnp.clip(depth - 1, 0, k - 1), axis=1)
        on = (
            (depth >= 1)
            & (tok == prop)
            & jnp.take_along_axis(state.ok, jnp.clip(depth - 1, 0, k - 1), axis=1)
        )
        at = lambda x: jnp.take_along_axis(
            x[jnp.arange(x.shape[0]), state.match_n], jnp.clip(depth - 1, 0, k - 1), 1
        )
        return jnp.where(on, (at(state.hits) + 1) / (at(state.trials) + 2), 0.0)

    def _matches(self, ctx: Context, n: int) -> Bool[Array, "B S"]:
        """match[b, p]: the row's last n tokens occur at p..p+n-1, ending before the suffix itself."""
        b, s = ctx.tokens.shape
        pos = jnp.arange(s)
        suffix = jnp.take_along_axis(ctx.tokens, jnp.maximum(ctx.lengths[:, None] - n + jnp.arange(n), 0), 1)
        match = jnp.ones((b, s), bool)
        for i in range(n):
            match &= jnp.roll(ctx.tokens, -i, axis=1) == suffix[:, i : i + 1]
        return match & (pos[None, :] + n < ctx.lengths[:, None]) & (ctx.lengths[:, None] >= n)

    def _proposal_at(self, ctx: Context, start: Int[Array, "B ..."]):
        """(the max_depth tokens from `start` on, which of them exist); start < 0: none."""
        idx = start[..., None] + jnp.arange(self.max_depth)
        ok = (start[..., None] >= 0) & (idx < ctx.lengths.reshape((-1,) + (1,) * start.ndim))
        flat = jnp.clip(idx, 0, ctx.tokens.shape[1] - 1).reshape(idx.shape[0], -1)
        proposal = jnp.take_along_axis(ctx.tokens, flat, axis=1).reshape(idx.shape)
        return jnp.where(ok, proposal, 0), ok

    def lookup(self, params, ctx: Context):
        """The proposal: (tokens [B, max_depth], ok [B, max_depth], matched suffix length [B], 0 =
        none). A datastore drafter (`specdec.drafters.rest`) answers it from `params`."""
        b, s = ctx.tokens.shape
        pos = jnp.arange(s)
        best_start = jnp.full((b,), -1)
        match_n = jnp.zeros((b,), jnp.int32)
        for n in range(self.min_n, self.max_n + 1):  # longer matches overwrite shorter ones
            latest = jnp.max(jnp.where(self._matches(ctx, n), pos[None, :], -1), axis=1)
            best_start = jnp.where(latest >= 0, latest + n, best_start)  # proposal starts after the match
            match_n = jnp.where(latest >= 0, n, match_n)
        proposal, ok = self._proposal_at(ctx, best_start)
        return proposal, ok, match_n

    def candidates(self, ctx: Context, r: int):
        """Up to `r` proposals per row from different occurrences (retrieval for tree fusion):
        (tokens [B, r, max_depth], ok [B, r, max_depth], matched suffix length [B, r], 0 = none).

        Each position c after an occurrence of one of the row's suffixes (lengths min_n..max_n) is
        a candidate start, scored by its longest matched suffix, then by lateness; the r best
        starts are taken and a proposal equal to a better one is dropped (the rest move up). The
        first equals the drafter's own proposal."""
        b, s = ctx.tokens.shape
        best_n = jnp.zeros((b, s), jnp.int32)  # at continuation start c = p + n
        for n in range(self.min_n, self.max_n + 1):
            at_c = jnp.roll(self._matches(ctx, n), n, axis=1).at[:, :n].set(False)
            best_n = jnp.where(at_c, n, best_n)
        score = jnp.where(best_n > 0, best_n * s + jnp.arange(s)[None, :], -1)
        top, start = jax.lax.top_k(score, min(r, s))
        start = jnp.where(top >= 0, start, -1)
        n = jnp.take_along_axis(best_n, jnp.maximum(start, 0), axis=1) * (start >= 0)
        proposal, ok = self._proposal_at(ctx, start)
        same = jnp.all((proposal[:, :, None] == proposal[:, None]) & (ok[:, :, None] == ok[:, None]), -1)
        earlier = jnp.tril(jnp.ones((start.shape[1],) * 2, bool), -1)
        keep = (start >= 0) & ~jnp.any(same & earlier[None] & (start >= 0)[:, None, :], axis=-1)
        order = jnp.argsort(~keep, axis=1, stable=True)  # kept ones first, in score order
        take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)  # noqa: E731
        keep = take(keep)
        out = (jnp.where(keep[..., None], take(proposal), 0), take(ok) & keep[..., None], take(n) * keep)
        if out[0].shape[1] < r:  # a context shorter than r: pad with empty candidates
            pad = r - out[0].shape[1]
            out = tuple(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in out)
        return out

    @property
    def retrieval(self) -> tuple[int, int]:
        """(paths, length) of `retrieve` (a retrieval source: `specdec.drafters.fused`)."""
        return self.paths, self.max_depth

    def retrieve(self, params, ctx: Context):
        """`candidates(ctx, paths)` as a retrieval source: (tokens [B, R, L], ok [B, R, L])."""
        tokens, ok, _ = self.candidates(ctx, self.paths)
        return tokens, ok

    def _logits(self, token, ok):
        onehot = jax.nn.one_hot(token, self.vocab_size, dtype=bool)
        return jnp.where(ok[..., None], jnp.where(onehot, 0.0, _OFF), 0.0)

    def init(self, params, ctx: Context, prompt, prefill_taps, cache_size: int, *, window: int) -> NGramState:
        proposal, ok, match_n = self.lookup(params, ctx)
        zeros = jnp.zeros((ctx.lengths.shape[0], self.max_n + 1, self.max_depth), jnp.float32)
        return NGramState(proposal=proposal, ok=ok, match_n=match_n, hits=zeros, trials=zeros)

    def should_draft(self, params, state: NGramState, ctx: Context) -> Bool[Array, " B"]:
        """Rows with a proposal; when none has one the loop takes a plain AR step (T = 1)."""
        if not self.adaptive:
            return jnp.ones(ctx.lengths.shape, bool)
        return state.ok[:, 0]

    def begin(self, params, state: NGramState, ctx: Context):
        return self._logits(state.proposal[:, 0], state.ok[:, 0]), state

    def expand(self, params, state: NGramState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]):
        # A frontier node at depth d continues the proposal iff its path is the proposal's prefix;
        # checking its own token against proposal[d - 1] suffices along a chain of such nodes.
        k = self.max_depth
        depth = jnp.take_along_axis(tree.depth, frontier, axis=1)
        tok = jnp.take_along_axis(tree.tokens, frontier, axis=1)
        prev = jnp.take_along_axis(state.proposal, jnp.clip(depth - 1, 0, k - 1), axis=1)
        nxt_ok = jnp.take_along_axis(state.ok, jnp.clip(depth, 0, k - 1), axis=1) & (depth < k)
        on_path = (tok == prev) & (depth >= 1)
        nxt = jnp.take_along_axis(state.proposal, jnp.clip(depth, 0, k - 1), axis=1)
        return self._logits(nxt, nxt_ok & on_path), state

    def update(self, params, state: NGramState, ctx: Context, tree: Tree, verdict, taps) -> NGramState:
        # The verdict on this step's proposal joins the history of its match length: depth d was
        # a trial when the proposal reached it and depths < d were accepted, a hit when accepted.
        drafted = jnp.max(jnp.where(tree.valid, tree.depth, 0), axis=1)
        drafted = jnp.minimum(drafted, jnp.sum(state.ok, axis=1))  # nodes past the proposal are not its
        d = jnp.arange(1, self.max_depth + 1)[None, :]
        trials = (d <= drafted[:, None]) & (d <= verdict.n_accepted[:, None] + 1)
        hits = (d <= drafted[:, None]) & (d <= verdict.n_accepted[:, None])
        at = (jax.nn.one_hot(state.match_n, self.max_n + 1) * (state.match_n > 0)[:, None])[:, :, None]
        decay = jnp.where(at * trials[:, None, :] > 0, self.decay, 1.0)  # only what was verified ages
        new_hits = state.hits * decay + at * hits[:, None, :]
        new_trials = state.trials * decay + at * trials[:, None, :]
        # One lookup per step, on the new context: `should_draft` and `begin` read it.
        proposal, ok, match_n = self.lookup(params, ctx)
        return NGramState(proposal=proposal, ok=ok, match_n=match_n, hits=new_hits, trials=new_trials)

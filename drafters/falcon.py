"""Falcon: semi-autoregressive drafting, k tokens per drafter call (arXiv 2412.12639, AAAI 2025;
reference notes `drafters.md` §1.4, §2, §3.3).

The draft reads EAGLE pairs π_p = (f_{p-1}, t_p) (the target's final normed feature before the
token, the token) through EAGLE-1's layer (`fc([embed(t) ; f])`, one decoder layer, the target's
frozen head). Falcon's change is the **relaxed block-causal mask**: a pass takes a block of k
consecutive pairs ending at position e, every query of the block sees the whole block and all
earlier pairs, and the query at p predicts the feature f_{p+k-1}: one pass drafts the k tokens
t_{e+1} … t_{e+k}, all from the same context (pairs ≤ e).

In the loop (any tree builder): the pass anchored at the root uses the committed pairs
π_{P-k+1..P}; its outputs give depth 1's logits and the feature shared by every depth-1 node
(depth 2's logits do not depend on the depth-1 token: that is the semi-autoregressive trade).
A pass anchored at a node of depth d ≡ 0 (mod k) uses the block of its path's last k pairs and
serves depths d + 1 … d + k; nodes at other depths take their features from their ancestor's
pass, with no draft forward at all. For k = 2, a depth-8 tree costs 4 passes (Falcon's
"4 forward passes"). `static:falcon` is a tree shaped for this (wide at the pass boundaries).

Training (`train/losses.py: falcon_loss`): blocks of k with a random offset per batch (at inference
a block ends at the root, so any alignment occurs); **CSGD** (Coupled Sequential Glancing
Distillation): pass 1 without gradients drafts every block from the true pairs; pass 2 feeds those
drafted pairs back as the next blocks' inputs, except N = λ·d positions (d = draft/target token
mismatches, in whole blocks) that glance at the truth; λ = 0.35 (1 - step/steps) + 0.1 as in
Falcon's code. Loss = EAGLE-1's (SmoothL1 on features + 0.1 × divergence) on both passes.

Choices: no LSTM (the published module assigns the LSTM's output tuple without unpacking and scans
the batch axis, so it cannot run as released; EAGLE-1's fc fusion plus attention does the job of
mixing tokens and features, and a recurrent state per tree node would not fit the loop); one
decoder layer, so a pair's keys/values depend only on the pair and the committed cache is the
same whatever the block grouping; losses on both passes (the paper trains the glanced pass; the
first pass of every step at inference sees true pairs only).

State: EAGLE's draft KV cache (pair for position p at slot p - 1; `lengths` = the root's slot,
node i at slot lengths + i), per node the drafted feature `out` that predicts its children and the
feature `pending` its children inherit, and the last k target features `recent`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from specdec.attention import attend_cache
from specdec.cache import KVCache
from specdec.context import Context
from specdec.drafters import accept_head, eagle
from specdec.drafters.family import Built, Family, TrainTarget, option
from specdec.drafters.protocol import parent_confidence
from specdec.matmul import PackedWeight
from specdec.models import decoder
from specdec.tree import Tree, ancestor_mask


@dataclasses.dataclass(frozen=True)
class FalconConfig(eagle.EagleConfig):
    """EAGLE-1's layer (version 1) plus `k`, the tokens drafted per pass."""

    k: int = 2

    def __post_init__(self):
        super().__post_init__()
        if self.version != 1 or self.k < 1:
            raise ValueError(
                f"Falcon uses EAGLE-1's layer (version 1) and k >= 1, got {self.version}, {self.k}"
            )

    @classmethod
    def for_target(cls, cfg, version: int = 1, draft_vocab_size: int | None = None, **kw) -> FalconConfig:
        return super().for_target(cfg, 1, draft_vocab_size, **kw)


def block_mask(n: int, k: int, offset: int | Int[Array, ""] = 0) -> Bool[Array, "n n"]:
    """Relaxed block-causal mask over n pairs: blocks of k (block of p = (p + offset) // k); a query
    sees every pair of its own block and of earlier blocks."""
    blk = (jnp.arange(n) + offset) // k
    return blk[None, :] <= blk[:, None]


def sar_forward(params, cfg: FalconConfig, tokens, feats, positions, mask: Bool[Array, "B T T"]):
    """The draft layer over pairs (feats = f_{p-1}, tokens = t_p) under `mask`, no cache; the output
    at p is the drafted f_{p+k-1}."""
    return eagle.run_layer(params, cfg, tokens, feats, positions, None, mask)[0]


def glance(key, true_tok, true_feat, pred_tok, pred_feat, valid: Bool[Array, "B T"], lam, k: int):
    """CSGD's glancing input: drafted pairs everywhere, except round(λ·d) positions per row (d = the
    rows' draft/target token mismatches among `valid`), in whole k-blocks chosen at random, that
    keep the true pair. Returns (tokens, feats, revealed [B, T])."""
    b, t = true_tok.shape
    nb = -(-t // k)
    d = jnp.sum((pred_tok != true_tok) & valid, axis=1)
    n_blocks = jnp.ceil(jnp.round(lam * d) / k).astype(jnp.int32)  # [B]
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (b, nb)), axis=1), axis=1)
    reveal_block = rank < n_blocks[:, None]
    revealed = jnp.repeat(reveal_block, k, axis=1)[:, :t] | ~valid
    tok = jnp.where(revealed, true_tok, pred_tok)
    feat = jnp.where(revealed[..., None], true_feat, pred_feat)
    return tok, feat, revealed


@flax.struct.dataclass
class FalconState:
    cache: KVCache  # lengths = the root's slot (the root's pair is written)
    out: Float[Array, "B W D"]  # drafted feature at each node (predicts its children)
    pending: Float[Array, "B W D"]  # the feature a node's children inherit from its pass
    recent: Float[Array, "B K D"]  # target features f_{P-k} .. f_{P-1} (P = the root's position)


@dataclasses.dataclass(frozen=True)
class Falcon(accept_head.AcceptanceMembers):
    """The Falcon drafter (contract: `specdec.drafter`); per-node features sized by `init`'s window."""

    cfg: FalconConfig
    # SpecDec++ acceptance heads (`specdec.drafters.accept_head`), read at a node's `out` as EAGLE-1's;
    # set by the checkpoint loader; () = none, and no `acceptance` member
    accept_heads: tuple[accept_head.HeadSpec, ...] = ()

    @property
    def taps(self) -> tuple[int, ...]:
        return self.cfg.taps

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def _accept_input(self, params, state: FalconState, tree: Tree, nodes: Int[Array, "B F"]):
        """`state.out` at the nodes: a node's own pass output at depths ≡ 0 (mod k), the feature it
        inherited from its anchor's pass at the others (`accept_head.AcceptanceMembers`)."""
        return eagle.accept_input(params, self.cfg, jnp.take_along_axis(state.out, nodes[:, :, None], axis=1))

    def _confidence(self, params, state: FalconState, tree: Tree, nodes, sampling) -> Float[Array, "B F"]:
        return parent_confidence(lambda o: self._logits(params, o), state.out, tree, nodes, sampling)

    def _logits(self, params, out):
        return eagle.to_target_vocab(eagle.draft_logits(params, self.cfg, out), params.get("d2t"),
                                     self.cfg.vocab_size)  # fmt: skip

    def _write_pairs(self, params, cache, tokens, feats, positions, slots):
        x, _ = eagle.layer_input(params, self.cfg, tokens, feats)
        _, k, v = decoder.qkv(params["layer"], self.cfg.layer_cfg, x, positions, norm=self.cfg.layer_norm)
        return cache.write(0, k, v, slots)

    def _pass(self, params, cache, tokens, feats, positions, slots, window_mask):
        """One block pass: write the pairs' K/V at `slots`, attend over the committed slots plus the
        window slots `window_mask` allows ([B, T, W]); returns the outputs [B, T, D]."""
        return eagle.run_layer(params, self.cfg, tokens, feats, positions, cache, window_mask, slots)

    def init(
        self, params, ctx: Context, prompt, prefill_taps, cache_size: int, *, window: int
    ) -> FalconState:
        b, t = prompt.shape
        cache = KVCache.init(self.cfg.layer_cfg, b, cache_size)
        pos = jnp.broadcast_to(jnp.arange(1, t + 1), (b, t))  # pairs for positions 1..t at slots 0..t-1
        toks = jnp.take_along_axis(ctx.tokens, jnp.minimum(pos, ctx.tokens.shape[1] - 1), axis=1)
        feat = prefill_taps[0]
        cache = self._write_pairs(params, cache, toks, feat, pos, pos - 1)
        root = ctx.lengths - 1
        idx = jnp.maximum(root[:, None] - self.cfg.k + jnp.arange(self.cfg.k)[None, :], 0)
        recent = jnp.take_along_axis(feat, idx[:, :, None], axis=1).astype(jnp.float32)
        zeros = jnp.zeros((b, window, feat.shape[-1]), jnp.float32)
        return FalconState(cache=cache.replace(lengths=root - 1), out=zeros, pending=zeros, recent=recent)

    def begin(self, params, state: FalconState, ctx: Context):
        """The pass anchored at the root over the committed pairs π_{P-k+1..P}."""
        k, b = self.cfg.k, ctx.tokens.shape[0]
        root = ctx.lengths - 1
        pos = root[:, None] - k + 1 + jnp.arange(k)[None, :]
        toks = jnp.take_along_axis(ctx.tokens, jnp.maximum(pos, 0), axis=1)
        cache = state.cache
        lp, lc = params["layer"], self.cfg.layer_cfg
        x, resid = eagle.layer_input(params, self.cfg, toks, state.recent)
        q, _, _ = decoder.qkv(lp, lc, x, pos, norm=self.cfg.layer_norm)
        mask = jnp.arange(cache.size)[None, None, :] <= cache.lengths[:, None, None]  # up to the root's pair
        mask = jnp.broadcast_to(mask, (b, k, cache.size))
        attn = attend_cache(q, cache, 0, mask, lc, kernel=isinstance(lp["wqkv"], PackedWeight))
        outs = decoder.finish(lp, lc, resid, attn)  # outs[:, j] = f̂_{P + j}
        out = state.out.at[:, 0].set(outs[:, 0])
        pending = state.pending.at[:, 0].set(outs[:, min(1, k - 1)])
        return self._logits(params, outs[:, 0]), state.replace(out=out, pending=pending)

    def expand(self, params, state: FalconState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]):
        """Children's logits of frontier nodes: from a pass anchored at nodes of depth ≡ 0 (mod k),
        from the ancestor pass's features otherwise (no forward when no frontier node needs one)."""
        k = self.cfg.k
        b, f = frontier.shape
        rows = jnp.arange(b)[:, None]
        depth = jnp.take_along_axis(tree.depth, frontier, axis=1)
        parent = jnp.maximum(jnp.take_along_axis(tree.parents, frontier, axis=1), 0)
        inherited = jnp.take_along_axis(state.pending, parent[:, :, None], axis=1)  # [B, F, D]
        anchored = (depth % k == 0) & (depth > 0)

        def run_pass(state):
            # The block: the last k nodes of each frontier node's path (ancestor j steps up, j < k).
            chain = [frontier]
            for _ in range(k - 1):
                chain.append(jnp.maximum(jnp.take_along_axis(tree.parents, chain[-1], axis=1), 0))
            nodes = jnp.stack(chain[::-1], axis=2)  # [B, F, k], oldest first
            par = jnp.maximum(jnp.take_along_axis(tree.parents, nodes.reshape(b, -1), axis=1), 0)
            node_tok = jnp.take_along_axis(
                jnp.where(tree.valid, tree.tokens, 0), nodes.reshape(b, -1), axis=1
            )
            # a pair's feature: the drafted feature of its parent node; the root's pair: the target's f_{P-1}
            feat = jnp.take_along_axis(state.out, par[:, :, None], axis=1)
            is_root = (nodes.reshape(b, -1) == 0)[..., None]
            feat = jnp.where(is_root, state.recent[:, -1:, :], feat)
            node_depth = jnp.take_along_axis(tree.depth, nodes.reshape(b, -1), axis=1)
            pos = ctx.lengths[:, None] - 1 + node_depth
            anc = jnp.take_along_axis(ancestor_mask(tree), frontier[:, :, None], axis=1)  # [B, F, N]
            win = jnp.repeat(anc, k, axis=1)  # every query of a node's block sees its path
            slots = state.cache.lengths[:, None] + nodes.reshape(b, -1)
            outs, cache = self._pass(params, state.cache, node_tok, feat, pos, slots, win)
            outs = outs.reshape(b, f, k, -1)
            return outs[:, :, 0], outs[:, :, min(1, k - 1)], cache

        def no_pass(state):
            return inherited, inherited, state.cache

        first, second, cache = jax.lax.cond(jnp.any(anchored & (frontier > 0)), run_pass, no_pass, state)
        feat = jnp.where(anchored[..., None], first, inherited)
        out = state.out.at[rows, frontier].set(feat, mode="drop")
        pending = state.pending.at[rows, frontier].set(jnp.where(anchored[..., None], second, inherited),
                                                       mode="drop")  # fmt: skip
        return self._logits(params, feat), state.replace(cache=cache, out=out, pending=pending)

    def update(self, params, state: FalconState, ctx: Context, tree: Tree, verdict, taps) -> FalconState:
        """Write the committed pairs (positions old root + 1 .. new root) and the last k features."""
        block, k = tree.max_depth + 1, self.cfg.k
        old = state.cache.lengths  # the old root's slot = its position - 1
        n_new = ctx.lengths - 2 - old
        pos = old[:, None] + 2 + jnp.arange(block)[None, :]
        toks = jnp.take_along_axis(ctx.tokens, jnp.minimum(pos, ctx.tokens.shape[1] - 1), axis=1)
        feat = jnp.take_along_axis(taps[0], verdict.path[:, :block, None], axis=1).astype(jnp.float32)
        cache = self._write_pairs(params, state.cache.replace(lengths=old + 1), toks, feat, pos, pos - 1)
        seq = jnp.concatenate([state.recent, feat], axis=1)  # f at old root - k + j
        idx = n_new[:, None] + jnp.arange(k)[None, :]
        recent = jnp.take_along_axis(seq, idx[:, :, None], axis=1)
        return state.replace(cache=cache.replace(lengths=old + n_new), recent=recent)


# ------------------------------------------------------------------------------------ the trained family
@dataclasses.dataclass(frozen=True)
class FalconOptions:
    """specdec-train options of Falcon."""

    falcon_k: int = option(2, "Falcon: tokens drafted per semi-autoregressive pass.", lower_bound=1)
    noise: float = option(0.1, eagle.NOISE_HELP)


def _build(opts: FalconOptions, tc, target: TrainTarget, key) -> Built:
    from specdec.train import losses  # here: losses imports the drafter modules

    cfg = FalconConfig.for_target(target.cfg, 1, target.draft_vocab_size, k=opts.falcon_k)
    loss = functools.partial(
        losses.falcon_loss, cfg=cfg, noise=opts.noise, loss=tc.loss, total_steps=tc.steps
    )
    return Built(cfg, eagle.init_params(cfg, key), loss)


# the loss takes the global step (CSGD's glancing schedule); the held-out evaluation runs without noise
FAMILY = Family(name="falcon", config=FalconConfig, drafter=Falcon, options=FalconOptions, build=_build,
                shares=lambda cfg: ("embed", "head"), loss_takes_step=True, eval_kwargs={"noise": 0.0},
                shipped=True)  # fmt: skip

"""EAGLE drafters: feature-level autoregression with one decoder layer (EAGLE-1/2 and EAGLE-3).

The draft reads pairs (feature at position p-1, token at p) and outputs a feature for position p,
whose logits predict token p+1. Committed positions use the target's features (taps); tree nodes
use the draft's own output at the parent node (reference notes §1.2, §1.3, §3.2).

- version 1 (EAGLE-1 weights, used by static trees = EAGLE-1 and dynamic trees = EAGLE-2): the
  feature is the target's final normed state (tap L); `x = fc([embed(t) ; f])`, one decoder layer
  without an input norm, no final norm; logits = the target's frozen LM head.
- version 3 (EAGLE-3): the feature for committed positions is `fc([h_low ; h_mid ; h_high])`
  (three taps, raw residual states); the layer attends over `[norm(embed(t)) ; norm(g)]` (width 2D)
  with `g` as residual; final norm and the draft's own LM head.

Both may restrict logits to a draft vocabulary `d2t[Vd]` (draft id -> target id): EAGLE-3's
reduced head, and for version 1 the target head's rows at `d2t` (drafting cost on CPU is the
vocabulary). Logits handed to tree builders are over the target vocabulary, -inf elsewhere.

Params (`bind` adds the shared target arrays): `embed [V, D]` (target's), `head [D, Vd]`
(version 1: target head rows; version 3: own), `d2t [Vd]`, `fc_w [2D | 3Dt, D]`, optional `fc_b`,
optional `norm [D]` (v3), `layer`: `wqkv [D | 2D, (Hq + 2Hkv) Dh]`, `wo`, `mlp_norm`,
`w_gate_up`, `w_down`, and for v3 `input_norm`, `hidden_norm`.

Draft KV cache: the pair for position p sits at slot p - 1 (position 0 has no pair). After
`init`/`update`, `cache.lengths` is the root's slot (its pair already written, with the target's
feature) and `out[:, 0]` its output; tree node i is written at slot `lengths + i`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from specdec.attention import cache_mask
from specdec.cache import KVCache, causal_mask
from specdec.context import Context
from specdec.drafters import accept_head
from specdec.drafters.family import Built, Family, InferenceOption, TrainTarget, option
from specdec.drafters.protocol import parent_confidence
from specdec.matmul import PackedWeight, dense
from specdec.models import decoder
from specdec.models.config import ModelConfig
from specdec.models.decoder import rms_norm
from specdec.prefill import prefill_blocks
from specdec.tree import Tree, ancestor_mask

NEG = -1e30


@dataclasses.dataclass(frozen=True)
class EagleConfig:
    version: int  # 1 or 3
    vocab_size: int  # the target's
    draft_vocab_size: int
    hidden_size: int
    target_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    taps: tuple[int, ...]  # v1: (L,); v3: (low, mid, high)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    fc_bias: bool = False

    def __post_init__(self):
        if self.version not in (1, 3):
            raise ValueError(f"EAGLE version must be 1 or 3, got {self.version}")
        if len(self.taps) != (1 if self.version == 1 else 3):
            raise ValueError(
                f"EAGLE-{self.version} takes {1 if self.version == 1 else 3} taps, got {self.taps}"
            )

    @classmethod
    def for_target(cls, cfg: ModelConfig, version: int, draft_vocab_size: int | None = None, **kw):
        """A draft layer shaped like one of the target's layers (the papers' choice)."""
        L = cfg.num_layers
        taps = (L,) if version == 1 else tuple(min(max(t, 0), L) for t in (2, L // 2, L - 3))
        return cls(version=version, vocab_size=cfg.vocab_size,
                   draft_vocab_size=draft_vocab_size or cfg.vocab_size, hidden_size=cfg.hidden_size,
                   target_hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                   num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   intermediate_size=cfg.intermediate_size, taps=kw.pop("taps", taps),
                   rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, **kw)  # fmt: skip

    @property
    def layer_norm(self) -> decoder.Norm:
        """The draft layer's input norm (`decoder.qkv`'s `norm`): none for version 1; version 3
        normalises the embedding and the feature halves of its input apart."""
        return None if self.version == 1 else ("input_norm", "hidden_norm")

    @property
    def layer_cfg(self) -> ModelConfig:
        """The draft layer as a one-layer ModelConfig (for attention, RoPE and its cache)."""
        return ModelConfig(arch="llama", vocab_size=self.draft_vocab_size, hidden_size=self.hidden_size,
                           num_layers=1, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                           head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                           rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta)  # fmt: skip


def init_params(cfg: EagleConfig, key, target_head: np.ndarray | None = None) -> dict:
    """Random trainable params (v3's head starts from `target_head[:, d2t]` when given)."""
    d, dt, i = cfg.hidden_size, cfg.target_hidden_size, cfg.intermediate_size
    nq = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    din = d if cfg.version == 1 else 2 * d
    ks = jax.random.split(key, 6)
    dense = lambda k, a, b: jax.random.normal(k, (a, b), jnp.float32) * (a**-0.5)
    layer = {"wqkv": dense(ks[0], din, nq), "wo": dense(ks[1], cfg.num_heads * cfg.head_dim, d) * 0.1,
             "mlp_norm": jnp.ones((d,)), "w_gate_up": dense(ks[2], d, 2 * i),
             "w_down": dense(ks[3], i, d) * 0.1}  # fmt: skip
    p = {"layer": layer}
    if cfg.version == 1:
        p["fc_w"] = dense(ks[4], 2 * d, d)
        if cfg.fc_bias:
            p["fc_b"] = jnp.zeros((d,))
    else:
        p["fc_w"] = dense(ks[4], 3 * dt, d)
        layer["input_norm"] = jnp.ones((d,))
        layer["hidden_norm"] = jnp.ones((d,))
        p["norm"] = jnp.ones((d,))
        p["lm_head"] = (
            jnp.asarray(target_head, jnp.float32)
            if target_head is not None
            else dense(ks[5], d, cfg.draft_vocab_size)
        )
    return p


def fuse(params, cfg: EagleConfig, taps) -> Float[Array, "B T D"]:
    """The draft's input feature from target taps (v1: tap L as is; v3: fc over three taps)."""
    if cfg.version == 1:
        return taps[0]
    return dense(jnp.concatenate([t.astype(jnp.float32) for t in taps], axis=-1), params["fc_w"])


def layer_input(params, cfg: EagleConfig, tokens: Int[Array, "B T"], feat: Float[Array, "B T D"]):
    """(layer input, residual) of the draft layer for pairs (feat at p-1, token at p).

    Version 1: `x = fc([embed(t) ; f]) (+ fc_b)` [B, T, D], its own residual (the layer has no
    input norm). Version 3: `[embed(t) ; f]` [B, T, 2D], which the layer normalises half by half
    (`input_norm`, `hidden_norm`: `cfg.layer_norm`), with `f` as residual."""
    emb = params["embed"][tokens].astype(jnp.float32)
    feat = feat.astype(jnp.float32)
    if cfg.version == 1:
        x = dense(jnp.concatenate([emb, feat], axis=-1), params["fc_w"])
        if "fc_b" in params:
            x = x + params["fc_b"]
        return x, x
    return jnp.concatenate([emb, feat], axis=-1), feat


def draft_logits(params, cfg: EagleConfig, out: Float[Array, "... D"]) -> Float[Array, "... Vd"]:
    """Logits over the draft vocabulary."""
    if cfg.version == 3:
        out = rms_norm(out, params["norm"], cfg.rms_norm_eps)
    return dense(out, params["head"])


def accept_input(params, cfg: EagleConfig, out: Float[Array, "... D"]) -> Float[Array, "... D"]:
    """What an acceptance head reads of a node's output feature: the feature itself (version 1, a
    regressed final normed state) or its final norm (version 3, as SpecDec++ reads the normed state)."""
    return out if cfg.version == 1 else rms_norm(out, params["norm"], cfg.rms_norm_eps)


def to_target_vocab(logits: Float[Array, "... Vd"], d2t: Int[Array, " Vd"] | None, vocab: int):
    if d2t is None:
        return logits
    full = jnp.full(logits.shape[:-1] + (vocab,), NEG, jnp.float32)
    return full.at[..., d2t].set(logits)


def run_layer(params, cfg: EagleConfig, tokens, feat, positions, cache: KVCache | None,
              block_mask: Bool[Array, "B T W"], slots=None):  # fmt: skip
    """Draft layer (`decoder.layer`) over a block of pairs with the draft KV cache (None: the block
    alone); returns the output features [B, T, D] and the cache."""
    x, resid = layer_input(params, cfg, tokens, feat)
    lc = cfg.layer_cfg
    mask = cache_mask(lc, positions, cache, block_mask, slots)
    lp = params["layer"]
    return decoder.layer(lp, lc, x, positions, mask, cache, norm=cfg.layer_norm, resid=resid, slots=slots,
                         kernel=isinstance(lp["wqkv"], PackedWeight))  # fmt: skip


@flax.struct.dataclass
class EagleState:
    cache: KVCache  # lengths = the root's slot
    out: Float[Array, "B W D"]  # draft output feature at each tree node (node 0 = root)


@dataclasses.dataclass(frozen=True)
class Eagle(accept_head.AcceptanceMembers):
    """The EAGLE drafter (contract: `specdec.drafter`); per-node features sized by `init`'s window."""

    cfg: EagleConfig
    confidence: float = 0.0  # > 0: draft only when the root's top-1 draft probability reaches it
    # SpecDec++ acceptance heads in params["accept"][spec.key] (`specdec.drafters.accept_head`); set
    # by the checkpoint loader from drafter.json's "accept"; () = none, and no `acceptance` member
    # (`accept_head.AcceptanceMembers`)
    accept_heads: tuple[accept_head.HeadSpec, ...] = ()

    @property
    def taps(self) -> tuple[int, ...]:
        return self.cfg.taps

    @property
    def adaptive(self) -> bool:
        return self.confidence > 0

    def should_draft(self, params, state: EagleState, ctx: Context) -> Bool[Array, " B"]:
        """Rows whose draft is confident about the root's child; when none is, the loop takes a
        plain AR step (T = 1) instead of a verification block that would likely be rejected."""
        p = jax.nn.softmax(draft_logits(params, self.cfg, state.out[:, 0]), axis=-1)
        return jnp.max(p, axis=-1) >= self.confidence

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def _accept_input(self, params, state: EagleState, tree: Tree, nodes: Int[Array, "B F"]):
        """What a head reads at each node (`accept_head.AcceptanceMembers`): `state.out` there, which
        `expand(..., frontier=nodes)` computed by consuming the node's token."""
        return accept_input(params, self.cfg, jnp.take_along_axis(state.out, nodes[:, :, None], axis=1))

    def _confidence(self, params, state: EagleState, tree: Tree, nodes, sampling) -> Float[Array, "B F"]:
        return parent_confidence(lambda o: self._logits(params, o), state.out, tree, nodes, sampling)

    def _logits(self, params, out):
        return to_target_vocab(draft_logits(params, self.cfg, out), params.get("d2t"), self.cfg.vocab_size)

    def init(self, params, ctx: Context, prompt, prefill_taps, cache_size: int, *, window: int) -> EagleState:
        b, t = prompt.shape
        cache = KVCache.init(self.cfg.layer_cfg, b, cache_size)
        pos = jnp.broadcast_to(jnp.arange(1, t + 1), (b, t))  # pairs for positions 1..t at slots 0..t-1
        toks = jnp.take_along_axis(ctx.tokens, jnp.minimum(pos, ctx.tokens.shape[1] - 1), axis=1)
        feat = fuse(params, self.cfg, prefill_taps)
        run = lambda x, p, c, m: run_layer(params, self.cfg, *x, p, c, m)
        kernel = isinstance(params["layer"]["wqkv"], PackedWeight)
        out, cache = prefill_blocks(run, (toks, feat), cache, kernel=kernel, start=1)
        root = ctx.lengths - 1  # the root's position; its pair is at slot root - 1
        out_root = jnp.take_along_axis(out, (root - 1)[:, None, None], axis=1)
        return self._state(cache.replace(lengths=root - 1), out_root[:, 0], window)

    def _state(self, cache, out_root, window: int):
        out = jnp.zeros((out_root.shape[0], window, out_root.shape[-1]), jnp.float32)
        return EagleState(cache=cache, out=out.at[:, 0].set(out_root))

    def begin(self, params, state: EagleState, ctx: Context):
        return self._logits(params, state.out[:, 0]), state

    def expand(self, params, state: EagleState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]):
        cache = state.cache
        toks = jnp.take_along_axis(jnp.where(tree.valid, tree.tokens, 0), frontier, axis=1)
        parent = jnp.maximum(jnp.take_along_axis(tree.parents, frontier, axis=1), 0)
        feat = jnp.take_along_axis(state.out, parent[:, :, None], axis=1)
        depth = jnp.take_along_axis(tree.depth, frontier, axis=1)
        anc = jnp.take_along_axis(ancestor_mask(tree), frontier[:, :, None], axis=1)  # [B, F, N]
        pos = ctx.lengths[:, None] - 1 + depth
        out, cache = run_layer(
            params, self.cfg, toks, feat, pos, cache, anc, slots=cache.lengths[:, None] + frontier
        )
        node_out = state.out.at[jnp.arange(out.shape[0])[:, None], frontier].set(out, mode="drop")
        # frontier nodes are never the root, so out[:, 0] is kept
        return self._logits(params, out), state.replace(cache=cache, out=node_out)

    def update(self, params, state: EagleState, ctx: Context, tree: Tree, verdict, taps) -> EagleState:
        """Process the pairs committed by the step: positions old_root+1 .. new_root (<= D+1)."""
        b = ctx.tokens.shape[0]
        block = tree.max_depth + 1
        old = state.cache.lengths  # old root slot = old root position - 1
        n_new = ctx.lengths - 2 - old  # new root position - old root position (0 for finished rows)
        pos = old[:, None] + 2 + jnp.arange(block)[None, :]
        toks = jnp.take_along_axis(ctx.tokens, jnp.minimum(pos, ctx.tokens.shape[1] - 1), axis=1)
        path = verdict.path[:, :block]  # feature at position old_root + i = tap at path node i
        path_taps = tuple(jnp.take_along_axis(t, path[:, :, None], axis=1) for t in taps)
        feat = fuse(params, self.cfg, path_taps)
        cache = state.cache.replace(lengths=old + 1)  # the old root's pair is final
        out, cache = run_layer(params, self.cfg, toks, feat, pos, cache, causal_mask(b, block))
        last = jnp.take_along_axis(out, jnp.clip(n_new - 1, 0, block - 1)[:, None, None], axis=1)[:, 0]
        out_root = jnp.where((n_new > 0)[:, None], last, state.out[:, 0])
        return self._state(cache.replace(lengths=old + n_new), out_root, state.out.shape[1])


# ---------------------------------------------------------------------------------- the trained families
NOISE_HELP = "EAGLE-1 / Falcon: feature noise U(-a, a) on the target's features in training."


@dataclasses.dataclass(frozen=True)
class EagleOptions:
    """specdec-train options of EAGLE-1/2."""

    noise: float = option(0.1, NOISE_HELP)
    align_steps: int = option(
        1, "EAGLE-1: HASS harmonised context alignment, steps feeding the draft's own features back "
        "(1 = teacher-forced only; docs/training.md).", lower_bound=1,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Eagle3Options:
    """specdec-train options of EAGLE-3."""

    ttt_steps: int = option(3, "EAGLE-3 training-time-test steps (paper: 7).")


def _build1(opts: EagleOptions, tc, target: TrainTarget, key) -> Built:
    from specdec.train import losses  # here: losses imports the drafter modules

    cfg = EagleConfig.for_target(target.cfg, 1, target.draft_vocab_size)
    loss = functools.partial(losses.eagle1_loss, cfg=cfg, noise=opts.noise, loss=tc.loss,
                             align_steps=opts.align_steps)  # fmt: skip
    return Built(cfg, init_params(cfg, key), loss)


def _build3(opts: Eagle3Options, tc, target: TrainTarget, key) -> Built:
    from specdec.train import losses

    cfg = EagleConfig.for_target(target.cfg, 3, target.draft_vocab_size)
    loss = functools.partial(losses.eagle3_loss, cfg=cfg, ttt_steps=opts.ttt_steps,
                             tap_final=target.cfg.num_layers, loss=tc.loss)  # fmt: skip
    return Built(cfg, init_params(cfg, key, target.head), loss)  # its own head starts as the target's


CONFIDENCE = InferenceOption(
    parse=float,
    apply=lambda d, conf: dataclasses.replace(d, confidence=conf) if conf else d,
    usage="{name}:conf=0.5 (draft only when confident)",
)
# EAGLE-1 and EAGLE-3 are both stored as "eagle", told apart by config.version
EAGLE1 = Family(name="eagle", config=EagleConfig, drafter=Eagle, options=EagleOptions, build=_build1,
                shares=lambda cfg: ("embed", "head"), eval_kwargs={"noise": 0.0},
                inference={"conf": CONFIDENCE}, variant={"version": 1}, shipped=True)  # fmt: skip
EAGLE3 = Family(name="eagle3", config=EagleConfig, drafter=Eagle, options=Eagle3Options, build=_build3,
                shares=lambda cfg: ("embed",), inference={"conf": CONFIDENCE}, stored="eagle",
                variant={"version": 3}, shipped=True)  # fmt: skip

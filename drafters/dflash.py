"""DFlash: a block drafter — one non-causal forward drafts a whole block from injected target features.

(arXiv 2602.06036; reference notes `frontier.md` §1.) A few decoder layers at the target's width
read a block of `block_size` positions: the anchor (the step's root, the newest token, position P)
followed by `block_size - 1` mask positions. Block position k predicts the token at P + k, so one
forward yields `block_size - 1` draft distributions. The target's features are injected into every
draft layer's keys and values: committed positions j < P contribute `K_j = k_proj(c_j)`,
`V_j = v_proj(c_j)` with `c_j = hidden_norm(fc([tap_1 ; ... ; tap_n]_j))`, the taps spread across
the target's depth; queries come from the block only, and the block attends to the context and
to itself bidirectionally. Embedding and LM head are the target's, frozen (the head optionally
restricted to a draft vocabulary `d2t`, as EAGLE's).

Choices where the public text is silent or does not fit this target (measured or documented):
- the mask positions use one learned embedding `mask_embed [D]` (SmolLM2 has no mask token;
  DFlash adds `<|MASK|>` to the tokenizer, which is the same thing: one trained vector);
- draft layers are the target's own layer form (Llama: pre-norm, GQA, SwiGLU; no q/k-norm — Qwen3's
  q/k-norm belongs to its targets);
- taps default to EAGLE-3's (2, L/2, L-3) in HF numbering (residual streams after layers 1, L/2-1,
  L-4; DFlash's `build_target_layer_ids` spreads n of them from layer 1 to L-3 and reads
  `hidden_states[id + 1]`, the same convention), so one feature cache serves EAGLE-3 and DFlash.

In the loop DFlash is a parallel-heads drafter (the protocol's Medusa pattern): `begin` runs the
block and returns position 1's logits; `expand` returns position d + 1's logits for frontier nodes
at depth d, so chains, static trees and dynamic trees (a best-first tree over the block's
per-position distributions, DDTree-style) all work. `update` writes the committed tokens' context
K/V from the verification forward's taps into the draft KV cache (`cache.lengths` = P): the cache
never holds block positions past a step (they are written at slots P.. and overwritten next step).

Params: `fc_w [n*Dt, D]`, `hidden_norm [D]`, `mask_embed [D]`, `layers.{i}` (`models/decoder.py`);
`norm [D]`; bound from the target: `embed`, `head`
(rows at `d2t`), `d2t`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from specdec.attention import attend, attend_lse, merge_lse
from specdec.cache import KVCache
from specdec.context import Context
from specdec.drafters import accept_head
from specdec.drafters.eagle import to_target_vocab
from specdec.drafters.family import Built, Family, InferenceOption, TrainTarget, option
from specdec.drafters.protocol import by_node_depth, logits_by_depth, parallel_confidence
from specdec.matmul import PackedWeight, dense, plain
from specdec.models import decoder
from specdec.models.config import ModelConfig
from specdec.models.decoder import rms_norm
from specdec.tree import Tree


@dataclasses.dataclass(frozen=True)
class DFlashConfig:
    vocab_size: int  # the target's
    draft_vocab_size: int
    hidden_size: int
    target_hidden_size: int
    num_layers: int  # draft layers
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    taps: tuple[int, ...]  # target hidden taps fused into the context feature (HF numbering)
    block_size: int = 16  # anchor + block_size - 1 drafted positions
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @classmethod
    def for_target(cls, cfg: ModelConfig, num_layers: int = 3, block_size: int = 16,
                   draft_vocab_size: int | None = None,
                   taps: tuple[int, ...] | None = None) -> DFlashConfig:  # fmt: skip
        """Draft layers shaped like the target's; taps spread over its depth (EAGLE-3's by default)."""
        L = cfg.num_layers
        taps = taps or tuple(min(max(t, 0), L) for t in (2, L // 2, L - 3))
        return cls(vocab_size=cfg.vocab_size, draft_vocab_size=draft_vocab_size or cfg.vocab_size,
                   hidden_size=cfg.hidden_size, target_hidden_size=cfg.hidden_size, num_layers=num_layers,
                   num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   intermediate_size=cfg.intermediate_size, taps=tuple(taps), block_size=block_size,
                   rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta)  # fmt: skip

    @property
    def layer_cfg(self) -> ModelConfig:
        """The draft stack as a ModelConfig (attention shapes, RoPE, its KV cache)."""
        return ModelConfig(arch="llama", vocab_size=self.draft_vocab_size, hidden_size=self.hidden_size,
                           num_layers=self.num_layers, num_heads=self.num_heads,
                           num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           intermediate_size=self.intermediate_size, rms_norm_eps=self.rms_norm_eps,
                           rope_theta=self.rope_theta)  # fmt: skip


def init_params(cfg: DFlashConfig, key) -> dict:
    """Random trainable params (each layer starts near identity, `decoder.init_layer`)."""
    d = cfg.hidden_size
    ks = jax.random.split(key, cfg.num_layers + 2)
    layers = {str(n): decoder.init_layer(ks[n], cfg.layer_cfg) for n in range(cfg.num_layers)}
    fc = jax.random.normal(ks[-2], (len(cfg.taps) * cfg.target_hidden_size, d)) * (len(cfg.taps) * d) ** -0.5
    return {"fc_w": fc, "hidden_norm": jnp.ones((d,)), "mask_embed": jax.random.normal(ks[-1], (d,)) * 0.02,
            "layers": layers, "norm": jnp.ones((d,))}  # fmt: skip


def init_from_target(cfg: DFlashConfig, key, target_params: dict) -> dict:
    """Trainable params warm-started from the target's last `num_layers` layers (an option,
    `specdec-train --dflash_init target`; DFlash itself starts from random layers).

    Draft layer n copies target layer L - num_layers + n (its attention norm as the input norm),
    `norm` the target's final norm; `fc` selects the deepest tap and `hidden_norm` is that first
    copied layer's attention norm, so draft layer 0 starts with exactly the target layer's keys and
    values of the context (for the default taps, tap L - 3 is layer L - 3's input). Deeper draft
    layers read the same context feature, an approximation training corrects."""
    params = init_params(cfg, key)
    layers = jax.tree.map(plain, target_params["layers"], is_leaf=lambda x: isinstance(x, PackedWeight))
    if isinstance(layers, dict):  # stacked [L, ...] (scan_layers): one dict per layer
        layers = [{k: v[i] for k, v in layers.items()} for i in range(len(layers["attn_norm"]))]
    first = len(layers) - cfg.num_layers
    if first < 0:
        raise ValueError(
            f"--dflash_init target: the target has {len(layers)} layers, fewer than --dflash_layers "
            f"{cfg.num_layers}; use fewer draft layers or --dflash_init random"
        )
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    for n in range(cfg.num_layers):
        lp = layers[first + n]
        if "bqkv" in lp:
            raise ValueError("--dflash_init target: the target's q/k/v biases have no place in a draft "
                             "layer; use --dflash_init random")  # fmt: skip
        params["layers"][str(n)] = {"input_norm": f32(lp["attn_norm"])} | {
            k: f32(lp[k]) for k in ("wqkv", "wo", "mlp_norm", "w_gate_up", "w_down")
        }
    dt, d = cfg.target_hidden_size, cfg.hidden_size
    deepest = max(range(len(cfg.taps)), key=lambda i: cfg.taps[i])
    fc = jnp.zeros((len(cfg.taps) * dt, d))
    params["fc_w"] = fc.at[deepest * dt : (deepest + 1) * dt].set(jnp.eye(dt, d))
    params["hidden_norm"] = f32(layers[first]["attn_norm"])
    params["norm"] = f32(target_params["final_norm"])
    return params


def context_features(params, cfg: DFlashConfig, taps) -> Float[Array, "B T D"]:
    """c = hidden_norm(fc([tap_1 ; ... ; tap_n])) at every position of the taps."""
    x = jnp.concatenate([t.astype(jnp.float32) for t in taps], axis=-1)
    return rms_norm(dense(x, params["fc_w"]), params["hidden_norm"], cfg.rms_norm_eps)


def block_embeddings(params, anchors: Int[Array, "..."], block_size: int) -> Float[Array, "... K D"]:
    """[embed(anchor), mask_embed × (K - 1)] for each anchor."""
    emb = params["embed"][anchors].astype(jnp.float32)[..., None, :]
    mask = jnp.broadcast_to(params["mask_embed"], anchors.shape + (block_size - 1, emb.shape[-1]))
    return jnp.concatenate([emb, mask], axis=-2)


def accept_input(params, cfg: DFlashConfig, h: Float[Array, "... D"]) -> Float[Array, "... D"]:
    """What an acceptance head reads of a block position's output: the normed state the vocabulary
    projection reads."""
    return rms_norm(h, params["norm"], cfg.rms_norm_eps)


def draft_logits(params, cfg: DFlashConfig, h: Float[Array, "... D"]) -> Float[Array, "... Vd"]:
    return dense(accept_input(params, cfg, h), params["head"])


def context_mask(anchors: Int[Array, "B A"], t: int, block_size: int) -> Bool[Array, "B AK T"]:
    """Query (a, k) of block a sees context position s iff s < anchors[a]."""
    return jnp.arange(t)[None, None, :] < jnp.repeat(anchors, block_size, axis=1)[:, :, None]


def training_mask(anchors: Int[Array, "B A"], t: int, block_size: int) -> Bool[Array, "B AK T+AK"]:
    """Anchored-block training visibility: block a's queries see context keys at positions strictly
    before its anchor and every key of their own block, never another block's."""
    b, a = anchors.shape
    k = block_size
    q_block = jnp.repeat(jnp.arange(a), k)  # [A*K] block of each query
    own = q_block[:, None] == q_block[None, :]  # [AK, AK]
    return jnp.concatenate([context_mask(anchors, t, k), jnp.broadcast_to(own, (b, a * k, a * k))], axis=-1)


def anchored_attention(q: Float[Array, "B AK Hq Dh"], kc: Float[Array, "B T Hkv Dh"],
                       vc: Float[Array, "B T Hkv Dh"], kb: Float[Array, "B AK Hkv Dh"],
                       vb: Float[Array, "B AK Hkv Dh"], anchors: Int[Array, "B A"],
                       cfg) -> Float[Array, "B AK HqDh"]:  # fmt: skip
    """`attend` under `training_mask` without its [AK, AK] block part, which is all masked but the
    diagonal blocks: each query attends to the context before its anchor ([AK, T]) and to its own
    block ([A, K, K]) apart, merged by log-sum-exp — O(AK (T + K)) scores instead of
    O(AK (T + AK)), what lets a step carry many anchors (128 anchors of 16 over 512 tokens: 4.8x
    fewer)."""
    b, ak = q.shape[:2]
    a = anchors.shape[1]
    k = ak // a
    per_block = lambda x: x.reshape((b * a, k) + x.shape[2:])  # noqa: E731
    out, lse = attend_lse(per_block(q), per_block(kb), per_block(vb), jnp.ones((1, 1, k), bool), cfg)
    own = (out.reshape((b, ak) + out.shape[2:]), lse.reshape((b, ak) + lse.shape[2:]))
    return merge_lse([attend_lse(q, kc, vc, context_mask(anchors, kc.shape[1], k), cfg), own])


def train_forward(params, cfg: DFlashConfig, tokens: Int[Array, "B T"], taps, anchors: Int[Array, "B A"],
                  split: bool = True):  # fmt: skip
    """Block outputs [B, A, K, D] for anchors at positions `anchors` (teacher-forced; no cache).

    Block a holds positions anchors[a] .. anchors[a] + K - 1; context = the taps at every position.
    `split` attends context and blocks apart (`anchored_attention`); False runs the dense
    `training_mask` (the reference it is tested against).
    """
    b, t = tokens.shape
    a, k = anchors.shape[1], cfg.block_size
    c = context_features(params, cfg, taps)
    ctx_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    blk_pos = (anchors[:, :, None] + jnp.arange(k)).reshape(b, a * k)
    h = block_embeddings(params, jnp.take_along_axis(tokens, anchors, axis=1), k).reshape(b, a * k, -1)
    mask = None if split else training_mask(anchors, t, k)
    lc = cfg.layer_cfg
    for n in range(cfg.num_layers):
        lp = params["layers"][str(n)]
        kc, vc = decoder.kv(lp, lc, c, ctx_pos)
        q, kb, vb = decoder.qkv(lp, lc, h, blk_pos)
        if split:
            attn = anchored_attention(q, kc, vc, kb, vb, anchors, lc)
        else:
            attn = attend(q, jnp.concatenate([kc, kb], 1), jnp.concatenate([vc, vb], 1), mask, lc)
        h = decoder.finish(lp, lc, h, attn)
    return h.reshape(b, a, k, -1)


@flax.struct.dataclass
class DFlashState:
    cache: KVCache  # injected context K/V per draft layer; lengths = P, the root's position
    logits: Float[Array, "B K V"]  # the block's per-position logits (position k: depth k)
    hidden: Float[Array, "B K D"]  # the block's per-position `accept_input` (acceptance heads read it)


@dataclasses.dataclass(frozen=True)
class DFlash(accept_head.AcceptanceMembers):
    """The DFlash drafter (protocol in `drafters/protocol.py`)."""

    cfg: DFlashConfig
    # SpecDec++ acceptance heads (`accept_head`; set by the checkpoint loader, () = none): one head
    # shared by the block positions over position d's state, with a per-depth bias
    accept_heads: tuple[accept_head.HeadSpec, ...] = ()

    @property
    def taps(self) -> tuple[int, ...]:
        return self.cfg.taps

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_depth(self) -> int:
        """Block position d drafts depth d: a tree deeper than block - 1 is refused."""
        return self.cfg.block_size - 1

    def with_block(self, block: int) -> DFlash:
        """This drafter with an inference block of `block` positions (anchor + block - 1 masks),
        2 <= block <= the trained size. Fewer mask positions cost less per forward; a tree deeper
        than block - 1 is refused (`max_depth`). Any block is lossless (the target
        verifies); whether acceptance holds is measured (docs/drafters.md)."""
        if not 2 <= block <= self.cfg.block_size:
            raise ValueError(f"block={block}: this DFlash drafts blocks of 2..{self.cfg.block_size} tokens")
        return dataclasses.replace(self, cfg=dataclasses.replace(self.cfg, block_size=block))

    def _write_context(self, params, cache: KVCache, taps, positions: Int[Array, "B T"]) -> KVCache:
        """Context K/V of taps at `positions` into every layer, at slots = positions."""
        c = context_features(params, self.cfg, taps)
        for n in range(self.cfg.num_layers):
            k, v = decoder.kv(params["layers"][str(n)], self.cfg.layer_cfg, c, positions)
            cache = cache.write(n, k, v, positions)
        return cache

    def init(
        self, params, ctx: Context, prompt, prefill_taps, cache_size: int, *, window: int
    ) -> DFlashState:
        b, t = prompt.shape
        cache = KVCache.init(self.cfg.layer_cfg, b, cache_size + self.cfg.block_size)
        cache = self._write_context(params, cache, prefill_taps, jnp.broadcast_to(jnp.arange(t), (b, t)))
        cache = cache.replace(lengths=ctx.lengths - 1)  # context = positions < the root's
        k, d = self.cfg.block_size, self.cfg.hidden_size
        return DFlashState(cache=cache, logits=jnp.zeros((b, k, self.cfg.vocab_size), jnp.float32),
                           hidden=jnp.zeros((b, k, d), jnp.float32))  # fmt: skip

    def block(self, params, cache: KVCache, root: Int[Array, " B"]
              ) -> tuple[Float[Array, "B K V"], Float[Array, "B K D"], KVCache]:  # fmt: skip
        """Target-vocabulary logits and `accept_input` of the block anchored at the root (position
        `cache.lengths`).

        The block's own K/V are written at slots past `lengths` (so the returned cache is valid:
        keeping it avoids a copy; `update` overwrites those slots with committed context)."""
        b, k = root.shape[0], self.cfg.block_size
        pos = cache.lengths[:, None] + jnp.arange(k)[None, :]
        h = block_embeddings(params, root, k)
        mask = cache.attention_mask(jnp.ones((b, k, k), bool))  # the context + the whole block
        kernel = isinstance(params["layers"]["0"]["wqkv"], PackedWeight)
        lc = self.cfg.layer_cfg
        for n in range(self.cfg.num_layers):
            # the block's K/V go to slots P.. (past lengths: dropped from the next step)
            h, cache = decoder.layer(params["layers"][str(n)], lc, h, pos, mask, cache, n, kernel=kernel)
        g = accept_input(params, self.cfg, h)
        logits = to_target_vocab(dense(g, params["head"]), params.get("d2t"), self.cfg.vocab_size)
        return logits, g, cache

    def begin(self, params, state: DFlashState, ctx: Context):
        logits, hidden, cache = self.block(params, state.cache, ctx.root)
        return logits[:, 1], state.replace(cache=cache, logits=logits, hidden=hidden)

    def expand(self, params, state: DFlashState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]):
        return logits_by_depth(state.logits, tree, frontier, first=1), state

    def _accept_input(self, params, state: DFlashState, tree: Tree, nodes: Int[Array, "B F"]):
        return by_node_depth(state.hidden, tree, nodes, first=1)

    def _confidence(self, params, state: DFlashState, tree: Tree, nodes, sampling) -> Float[Array, "B F"]:
        return parallel_confidence(state.logits, tree, nodes, sampling, first=1)

    def update(self, params, state: DFlashState, ctx: Context, tree: Tree, verdict, taps) -> DFlashState:
        """Write the context K/V of the step's committed tokens (old root + accepted nodes)."""
        block = tree.max_depth + 1
        old = state.cache.lengths
        path = verdict.path[:, :block]  # committed position old + i = tap at path node i
        path_taps = tuple(jnp.take_along_axis(t, path[:, :, None], axis=1) for t in taps)
        cache = self._write_context(params, state.cache, path_taps, old[:, None] + jnp.arange(block)[None, :])
        return state.replace(cache=cache.replace(lengths=ctx.lengths - 1))


# ------------------------------------------------------------------------------------ the trained family
@dataclasses.dataclass(frozen=True)
class DFlashOptions:
    """specdec-train options of DFlash (docs/training.md)."""

    dflash_layers: int = option(3, "DFlash: draft decoder layers at the target's width.", lower_bound=1)
    block_size: int = option(
        16, "DFlash: block size (the anchor + block_size - 1 drafted tokens).", lower_bound=2
    )
    num_anchors: int = option(32, "DFlash: anchored blocks per training sequence.", lower_bound=1)
    dflash_weighting: str = option(
        "decay", "DFlash position weights: exp(-(k-1)/gamma) or D-PACE.", choices=("decay", "dpace")
    )
    dflash_gamma: float = option(7.0, "DFlash: decay constant gamma of the position weights.")
    dflash_init: str = option(
        "random", "DFlash draft layers: random, or the target's last layers.", choices=("random", "target")
    )


def _build(opts: DFlashOptions, tc, target: TrainTarget, key) -> Built:
    from specdec.train import losses  # here: losses imports the drafter modules

    cfg = DFlashConfig.for_target(target.cfg, opts.dflash_layers, opts.block_size, target.draft_vocab_size)
    if opts.dflash_init == "target":
        params = init_from_target(cfg, key, target.params)
    else:
        params = init_params(cfg, key)
    loss = functools.partial(losses.dflash_loss, cfg=cfg, num_anchors=opts.num_anchors,
                             gamma=opts.dflash_gamma, weighting=opts.dflash_weighting, loss=tc.loss,
                             tap_final=target.cfg.num_layers)  # fmt: skip
    return Built(cfg, params, loss)


def _block(value: str) -> int:
    if not value.isdigit():
        raise ValueError(value)
    return int(value)


BLOCK = InferenceOption(
    parse=_block,
    apply=lambda d, block: d.with_block(block) if block else d,
    usage="{name}:block=4 (an inference block of 4 positions)",
)
FAMILY = Family(name="dflash", config=DFlashConfig, drafter=DFlash, options=DFlashOptions, build=_build,
                shares=lambda cfg: ("embed", "head"), inference={"block": BLOCK}, shipped=True)  # fmt: skip

"""Amphista: Medusa-style parallel heads with Staged Adaptation Layers and a bi-directional
Auto-embedding Block (Li et al., NAACL 2025; reference notes `amphista.md`; no public code).

At position t the drafter reads the target's final normed state h_t and the token sampled after
it, x_{t+1}; head k (0-based) predicts x_{t+k+2}. In the loop t = P - 1 (P the root's position),
so head k drafts depth k + 1 of the tree, exactly as Medusa's heads.

    u_t   = fc([h_t ; embed(x_{t+1})])                       token/feature fusion
    a¹_t  = causal decoder layer (stage 1) over u            Staged Adaptation Layers, each with
    a²_t  = causal decoder layer (stage 2) over a¹ + h       its own KV cache across steps
    h'_k  = a² + SiLU(W_k a² + b_k)                          per-head projections (ResBlocks)
    g     = encoder layer(s) over [h'_1 + PE_1, …, h'_K + PE_K], bi-directional across the K heads
    logits_k = head(norm(g_k))                               the target's frozen head (rows at d2t)
                                                             or per-head own heads (`own_heads`)

Choices where the public text is silent (the paper's method section is not available): the fusion
operator (a linear map of the concatenation, as EAGLE), what distinguishes the two stages (stage 2
sees stage 1's output plus the target feature again, so the second stage re-grounds the adapted
state in the target's own representation), the heads' form (Medusa's ResBlock), one encoder layer
with learned position embeddings PE [K, D] and no RoPE, a final RMSNorm before the vocabulary
projection, all layers in the target's geometry. Both head options are supported; the shipped
default is chosen by measurement (docs/drafters.md).

In the loop the adaptation layers keep a two-layer draft KV cache of committed pairs (slot t holds
the pair (h_t, x_{t+1}); `cache.lengths` = P after `init`/`update`), and `begin`/`expand` serve the
K heads' logits computed once per step, so Amphista plugs into every tree builder.

Params: `fc_w [2D, D]`, `stages.{0,1}` and `encoder.{i}` (`models/decoder.py` layers),
`heads_w [K, D, D]`, `heads_b [K, D]`, `pe [K, D]`, `norm [D]`, own `heads [K, D, Vd]` or the shared
`head [D, Vd]` (bound), `embed` (bound), `d2t`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from specdec.attention import cache_mask
from specdec.cache import KVCache, causal_mask
from specdec.context import Context
from specdec.drafters import accept_head
from specdec.drafters.eagle import to_target_vocab
from specdec.drafters.family import Built, Family, TrainTarget
from specdec.drafters.medusa import MedusaOptions
from specdec.drafters.protocol import by_node_depth, logits_by_depth, parallel_confidence
from specdec.matmul import PackedWeight, dense
from specdec.models import decoder
from specdec.models.config import ModelConfig
from specdec.models.decoder import rms_norm
from specdec.prefill import prefill_blocks
from specdec.tree import Tree


@dataclasses.dataclass(frozen=True)
class AmphistaConfig:
    num_draft_heads: int  # K
    vocab_size: int  # the target's
    draft_vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tap: int  # the target's final normed state (HF numbering L)
    own_heads: bool = False
    encoder_layers: int = 1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @classmethod
    def for_target(cls, cfg: ModelConfig, num_draft_heads: int = 4, draft_vocab_size: int | None = None,
                   own_heads: bool = False, encoder_layers: int = 1) -> AmphistaConfig:  # fmt: skip
        return cls(num_draft_heads=num_draft_heads, vocab_size=cfg.vocab_size,
                   draft_vocab_size=draft_vocab_size or cfg.vocab_size, hidden_size=cfg.hidden_size,
                   num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   intermediate_size=cfg.intermediate_size, tap=cfg.num_layers, own_heads=own_heads,
                   encoder_layers=encoder_layers, rms_norm_eps=cfg.rms_norm_eps,
                   rope_theta=cfg.rope_theta)  # fmt: skip

    @property
    def layer_cfg(self) -> ModelConfig:
        """The two adaptation stages as a ModelConfig (attention shapes, RoPE, their KV cache)."""
        return ModelConfig(arch="llama", vocab_size=self.draft_vocab_size, hidden_size=self.hidden_size,
                           num_layers=2, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                           head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                           rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta)  # fmt: skip


def init_params(cfg: AmphistaConfig, key, head: jnp.ndarray | None = None) -> dict:
    """Random trainable params; own heads start from the target's head rows `head [D, Vd]`."""
    d, k = cfg.hidden_size, cfg.num_draft_heads
    ks = jax.random.split(key, 4 + cfg.encoder_layers)
    lc = cfg.layer_cfg
    p = {
        "fc_w": jax.random.normal(ks[0], (2 * d, d)) * (2 * d) ** -0.5,
        "stages": {str(s): decoder.init_layer(ks[1 + s], lc) for s in range(2)},
        "heads_w": jnp.zeros((k, d, d)),  # each head starts as the identity (Medusa's init)
        "heads_b": jnp.zeros((k, d)),
        "pe": jax.random.normal(ks[3], (k, d)) * 0.02,
        "encoder": {str(i): decoder.init_layer(ks[4 + i], lc) for i in range(cfg.encoder_layers)},
        "norm": jnp.ones((d,)),
    }
    if cfg.own_heads:
        if head is None:
            raise ValueError("own_heads needs the target's head (rows at d2t) to initialise from")
        p["heads"] = jnp.broadcast_to(jnp.asarray(head, jnp.float32), (k,) + head.shape)
    return p


def adapt(params, cfg: AmphistaConfig, feat: Float[Array, "B T D"], next_tokens: Int[Array, "B T"],
          positions: Int[Array, "B T"], cache: KVCache | None, block_mask: Bool[Array, "B T W"],
          slots=None) -> tuple[Float[Array, "B T D"], KVCache | None]:  # fmt: skip
    """The Staged Adaptation Layers over pairs (h_t, x_{t+1}) at `positions` (causal; with the
    draft cache the block is written at `slots`, default `[lengths, lengths + T)`)."""
    lc = cfg.layer_cfg
    feat = feat.astype(jnp.float32)
    h = dense(jnp.concatenate([feat, params["embed"][next_tokens].astype(jnp.float32)], -1), params["fc_w"])
    mask = cache_mask(lc, positions, cache, block_mask, slots)
    for s in range(2):
        lp = params["stages"][str(s)]
        x = h if s == 0 else h + feat  # stage 2 re-reads the target feature
        h, cache = decoder.layer(lp, lc, x, positions, mask, cache, s, slots=slots,
                                 kernel=isinstance(lp["wqkv"], PackedWeight))  # fmt: skip
    return h, cache


def auto_embedding(params, cfg: AmphistaConfig, hk: Float[Array, "N K D"]) -> Float[Array, "N K D"]:
    """The Auto-embedding Block: learned head positions, attention across the K heads both ways."""
    lc = cfg.layer_cfg
    n, k, _ = hk.shape
    x = hk + params["pe"]
    zero = jnp.zeros((n, k), jnp.int32)  # no RoPE: position 0 rotates nothing; heads are told apart by PE
    everyone = jnp.ones((n, k, k), bool)
    for i in range(cfg.encoder_layers):
        x, _ = decoder.layer(params["encoder"][str(i)], lc, x, zero, everyone)
    return x


def head_hidden(params, cfg: AmphistaConfig, a: Float[Array, "... D"]) -> Float[Array, "... K D"]:
    """Every head's normed state after the Auto-embedding Block, what its vocabulary projection reads."""
    lead = a.shape[:-1]
    a = a.reshape(-1, a.shape[-1])
    hk = a[:, None, :] + jax.nn.silu(jnp.einsum("nd,kde->nke", a, params["heads_w"]) + params["heads_b"])
    g = rms_norm(auto_embedding(params, cfg, hk), params["norm"], cfg.rms_norm_eps)
    return g.reshape(lead + g.shape[1:])


def head_logits(params, cfg: AmphistaConfig, a: Float[Array, "... D"], g=None) -> Float[Array, "... K Vd"]:
    """Every head's draft-vocabulary logits from adapted states `a` (`g`: their `head_hidden`, if known)."""
    g = head_hidden(params, cfg, a) if g is None else g
    if cfg.own_heads:
        return jnp.einsum("...kd,kdv->...kv", g, params["heads"], preferred_element_type=jnp.float32)
    return dense(g, params["head"])


@flax.struct.dataclass
class AmphistaState:
    cache: KVCache  # the two stages' K/V of committed pairs; lengths = P, the root's position
    logits: Float[Array, "B K V"]  # head k's logits (depth k + 1) from the pair at P - 1
    hidden: Float[Array, "B K D"]  # head k's state there (`head_hidden`: acceptance heads read it)


@dataclasses.dataclass(frozen=True)
class Amphista(accept_head.AcceptanceMembers):
    """The Amphista drafter (protocol in `drafters/protocol.py`)."""

    cfg: AmphistaConfig
    # SpecDec++ acceptance heads (`accept_head`; set by the checkpoint loader, () = none): one head
    # shared by the depths over head d's state, with a per-depth bias
    accept_heads: tuple[accept_head.HeadSpec, ...] = ()

    @property
    def taps(self) -> tuple[int, ...]:
        return (self.cfg.tap,)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_depth(self) -> int:
        """Head d drafts depth d + 1: a tree deeper than the heads is refused (`specdec.drafter`)."""
        return self.cfg.num_draft_heads

    def _heads(self, params, a: Float[Array, "B D"]) -> tuple[Float[Array, "B K V"], Float[Array, "B K D"]]:
        g = head_hidden(params, self.cfg, a)
        return to_target_vocab(head_logits(params, self.cfg, a, g), params.get("d2t"), self.cfg.vocab_size), g

    def _accept_input(self, params, state: AmphistaState, tree: Tree, nodes: Int[Array, "B F"]):
        return by_node_depth(state.hidden, tree, nodes)

    def _confidence(self, params, state: AmphistaState, tree: Tree, nodes, sampling) -> Float[Array, "B F"]:
        return parallel_confidence(state.logits, tree, nodes, sampling)

    def init(
        self, params, ctx: Context, prompt, prefill_taps, cache_size: int, *, window: int
    ) -> AmphistaState:
        b, t = prompt.shape
        cache = KVCache.init(self.cfg.layer_cfg, b, cache_size)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))  # pair t = (h_t, x_{t+1}); P - 1 holds the root
        nxt = jnp.take_along_axis(ctx.tokens, jnp.minimum(pos + 1, ctx.tokens.shape[1] - 1), axis=1)
        run = lambda x, p, c, m: adapt(params, self.cfg, *x, p, c, m)
        kernel = isinstance(params["stages"]["0"]["wqkv"], PackedWeight)
        a, cache = prefill_blocks(run, (prefill_taps[0], nxt), cache, kernel=kernel)
        p = ctx.lengths - 1
        last = jnp.take_along_axis(a, (p - 1)[:, None, None], axis=1)[:, 0]
        logits, hidden = self._heads(params, last)
        return AmphistaState(cache=cache.replace(lengths=p), logits=logits, hidden=hidden)

    def begin(self, params, state: AmphistaState, ctx: Context):
        return state.logits[:, 0], state

    def expand(self, params, state: AmphistaState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]):
        return logits_by_depth(state.logits, tree, frontier), state

    def update(self, params, state: AmphistaState, ctx: Context, tree: Tree, verdict, taps) -> AmphistaState:
        """Adapt the step's committed pairs: positions old P .. new P - 1 (<= max_depth + 1)."""
        b, block = ctx.tokens.shape[0], tree.max_depth + 1
        old = state.cache.lengths
        n_new = ctx.lengths - 1 - old  # 0 for finished rows
        pos = old[:, None] + jnp.arange(block)[None, :]
        nxt = jnp.take_along_axis(ctx.tokens, jnp.minimum(pos + 1, ctx.tokens.shape[1] - 1), axis=1)
        feat = jnp.take_along_axis(taps[0], verdict.path[:, :block, None], axis=1)  # h at old P + i
        a, cache = adapt(params, self.cfg, feat, nxt, pos, state.cache, causal_mask(b, block))
        last = jnp.take_along_axis(a, jnp.clip(n_new - 1, 0, block - 1)[:, None, None], axis=1)[:, 0]
        logits, hidden = self._heads(params, last)
        new = (n_new > 0)[:, None, None]
        return AmphistaState(cache=cache.replace(lengths=old + n_new),
                             logits=jnp.where(new, logits, state.logits),
                             hidden=jnp.where(new, hidden, state.hidden))  # fmt: skip


# ------------------------------------------------------------------------------------ the trained family
def _build(opts: MedusaOptions, tc, target: TrainTarget, key) -> Built:
    from specdec.train import losses  # here: losses imports the drafter modules

    cfg = AmphistaConfig.for_target(target.cfg, opts.heads, target.draft_vocab_size, opts.own_heads)
    params = init_params(cfg, key, target.head if opts.own_heads else None)
    return Built(cfg, params, functools.partial(losses.amphista_loss, cfg=cfg, loss=tc.loss))


FAMILY = Family(
    name="amphista", config=AmphistaConfig, drafter=Amphista, options=MedusaOptions, build=_build,
    shares=lambda cfg: ("embed",) if cfg.own_heads else ("embed", "head"), shipped=True,
)  # fmt: skip

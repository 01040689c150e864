"""Medusa-1 heads: K parallel heads on the target's final normed hidden state (reference §1.1).

Head k (0-based) maps the feature f_i at position i to the token at i + k + 2 (the target's own
head predicts i + 1): `logits_k = head_k(f + SiLU(f W_k + b_k))`. `head_k` is either the head's
own matrix (Medusa-1 as in the paper; initialised from the target's head) or the target's frozen
head shared by all heads (the "version 2" format), optionally restricted to a draft vocabulary
`d2t[Vd]` (draft id -> target id) because on a CPU the 49k-row head dominates drafting.

In the loop the root is the newest token, which the target has not processed yet; the last
feature is the one that predicted the root, so head k drafts depth k + 1 of the tree. Heads do
not see their parent token: `expand` returns head d's logits for every frontier node at depth d
(depths past K reuse the last head), so Medusa plugs into any tree builder, static ones being
its natural fit.

Params: `w [K, D, D]`, `b [K, D]`, and `heads [K, D, Vd]` (own heads) or `head [D, Vd]`
(shared; added by `bind`), `d2t [Vd]` when the vocabulary is reduced.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from specdec.context import Context
from specdec.drafters import accept_head
from specdec.drafters.eagle import to_target_vocab
from specdec.drafters.family import Built, Family, TrainTarget, option
from specdec.drafters.protocol import by_node_depth, logits_by_depth, parallel_confidence
from specdec.matmul import dense
from specdec.tree import Tree


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
    num_heads: int
    hidden_size: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    own_heads: bool = False  # per-head LM heads (Medusa-1 paper) vs the target's shared head
    tap: int = -1  # the target's final normed state (HF numbering L); set by `for_target`

    @classmethod
    def for_target(cls, cfg, num_heads: int, draft_vocab_size: int | None = None, own_heads: bool = False):
        return cls(num_heads, cfg.hidden_size, cfg.vocab_size, draft_vocab_size or cfg.vocab_size,
                   own_heads, tap=cfg.num_layers)  # fmt: skip


def init_params(cfg: MedusaConfig, key, head: jnp.ndarray | None = None) -> dict:
    """Zero residual weights (each head starts as the target's head, as in Medusa), small bias."""
    k, d = cfg.num_heads, cfg.hidden_size
    p = {"w": jnp.zeros((k, d, d)), "b": jax.random.uniform(key, (k, d), minval=-(d**-0.5), maxval=d**-0.5)}
    if cfg.own_heads:
        if head is None:
            raise ValueError("own_heads needs the target's head (rows at d2t) to initialise from")
        p["heads"] = jnp.broadcast_to(jnp.asarray(head, jnp.float32), (k,) + head.shape)
    return p


def head_hidden(params, feat: Float[Array, "... D"]) -> Float[Array, "... K D"]:
    """Every head's state `f + SiLU(f W_k + b_k)`, what its vocabulary projection reads."""
    h = feat[..., None, :].astype(jnp.float32)  # [..., 1, D]
    hb = jnp.broadcast_to(h, h.shape[:-2] + params["b"].shape)
    return h + jax.nn.silu(jnp.einsum("...kd,kde->...ke", hb, params["w"]) + params["b"])


def head_logits(params, cfg: MedusaConfig, feat: Float[Array, "... D"], h=None) -> Float[Array, "... K Vd"]:
    """Every head's draft-vocabulary logits for features `feat` (`h`: their `head_hidden`, if known)."""
    h = head_hidden(params, feat) if h is None else h
    if cfg.own_heads:
        return jnp.einsum("...kd,kdv->...kv", h, params["heads"], preferred_element_type=jnp.float32)
    return dense(h, params["head"])


@flax.struct.dataclass
class MedusaState:
    logits: Float[Array, "B K V"]  # each head's logits from the feature that predicted the root
    hidden: Float[Array, "B K D"]  # each head's state there (`head_hidden`: acceptance heads read it)


@dataclasses.dataclass(frozen=True)
class Medusa(accept_head.AcceptanceMembers):
    cfg: MedusaConfig
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
        return self.cfg.num_heads

    def _state(self, params, feat: Float[Array, "B D"]) -> MedusaState:
        h = head_hidden(params, feat)
        logits = to_target_vocab(
            head_logits(params, self.cfg, feat, h), params.get("d2t"), self.cfg.vocab_size
        )
        return MedusaState(logits=logits, hidden=h)

    def _accept_input(self, params, state: MedusaState, tree: Tree, nodes: Int[Array, "B F"]):
        return by_node_depth(state.hidden, tree, nodes)

    def _confidence(self, params, state: MedusaState, tree: Tree, nodes, sampling) -> Float[Array, "B F"]:
        return parallel_confidence(state.logits, tree, nodes, sampling)

    def init(
        self, params, ctx: Context, prompt, prefill_taps, cache_size: int, *, window: int
    ) -> MedusaState:
        last = (ctx.lengths - 2)[:, None, None]  # the prompt's last position predicted the root
        return self._state(params, jnp.take_along_axis(prefill_taps[0], last, axis=1)[:, 0])

    def begin(self, params, state: MedusaState, ctx: Context):
        return state.logits[:, 0], state

    def expand(self, params, state: MedusaState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]):
        return logits_by_depth(state.logits, tree, frontier), state

    def update(self, params, state: MedusaState, ctx: Context, tree: Tree, verdict, taps) -> MedusaState:
        # The last accepted node's feature predicted the new root (the bonus/corrected token).
        last = jnp.take_along_axis(verdict.path, verdict.n_accepted[:, None], axis=1)
        feat = jnp.take_along_axis(taps[0], last[:, :, None], axis=1)[:, 0]
        return self._state(params, feat)


# ------------------------------------------------------------------------------------ the trained family
@dataclasses.dataclass(frozen=True)
class MedusaOptions:
    """specdec-train options of Medusa (and Amphista, which takes the same)."""

    heads: int = option(4, "Medusa / Amphista / Medusa-2 heads.")
    own_heads: bool = option(
        False, "Medusa / Amphista: one LM head per head instead of the target's shared head."
    )


def _build(opts: MedusaOptions, tc, target: TrainTarget, key) -> Built:
    from specdec.train import losses  # here: losses imports the drafter modules

    cfg = MedusaConfig.for_target(target.cfg, opts.heads, target.draft_vocab_size, opts.own_heads)
    params = init_params(cfg, key, target.head if opts.own_heads else None)
    return Built(cfg, params, functools.partial(losses.medusa_loss, cfg=cfg, loss=tc.loss))


FAMILY = Family(name="medusa", config=MedusaConfig, drafter=Medusa, options=MedusaOptions, build=_build,
                shares=lambda cfg: () if cfg.own_heads else ("head",), shipped=True)  # fmt: skip

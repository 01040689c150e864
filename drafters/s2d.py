"""S2D: one sorted, multi-exit draft model whose exit is chosen per step by confidence.

S2D (sorted speculative decoding) drafts with nested sub-models of one draft model, the first
layers of it sharing the output head, trained together by Sorted Fine-Tuning (SoFT: every exit
learns the target's next token), and picks the sub-model by confidence thresholds, one threshold
vector per target. Its paper has no public code; what follows is this implementation's reading of
it: the exit's form, the learned confidence and one exit per step are choices made here.

The draft is the target's first `exits[-1]` layers, taken by reference (as `layer_skip`'s), with
an exit after each of `exits`. Exit i maps the residual stream h after `exits[i]` layers to

    x_i = n + SiLU(n W_i),  n = RMSNorm(h; norm_i)       (W_i zero-initialised: a layer-skip exit)
    logits_i = x_i @ head                                  (the target's LM head, shared)
    confidence_i = sigmoid(x_i . c_i + b_i)                (P(exit i's argmax is the target's token))

The confidence costs D multiply-adds, so choosing an exit computes no LM head but the chosen one's
(on the embedded target the head is 28M of the 135M parameters). Exit per step (one per round, so
every tree node has the KV of the layers it attends): the catch-up runs the committed tokens
through the layers of the deepest exit the drafter can reach (`S2D.reach`: a pinned exit, or the
first whose threshold is 0, which always takes the step, else the last), so those layers' KV stays
complete, and scores the root at each reachable exit; the step drafts at the shallowest exit whose
confidence reaches its threshold for every running row (else the deepest reachable), its tree
nodes running only that exit's layers (`lax.switch`, one compiled branch per reachable exit).
`exit=K` pins the exit after K layers (per-exit measurements).

Lossless: drafts are verified by the unchanged verifiers; exits only change what is drafted.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from specdec.cache import KVCache, causal_mask
from specdec.context import Context
from specdec.drafters.eagle import to_target_vocab
from specdec.drafters.family import Built, Family, InferenceOption, TrainTarget, option
from specdec.matmul import dense
from specdec.models.config import ModelConfig
from specdec.models.decoder import rms_norm
from specdec.models.llama import forward, prefill
from specdec.tree import Tree, ancestor_mask


@dataclasses.dataclass(frozen=True)
class S2DConfig:
    """A sorted draft over a target: exits after `exits` of its layers (increasing), thresholds for
    every exit but the last (the last always takes the step), the target's sizes."""

    exits: tuple[int, ...] = (4, 8, 12)
    thresholds: tuple[float, ...] = (0.7, 0.6)
    hidden_size: int = 576
    vocab_size: int = 49152

    def __post_init__(self):
        object.__setattr__(self, "exits", tuple(int(e) for e in self.exits))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if not self.exits or list(self.exits) != sorted(set(self.exits)) or self.exits[0] < 1:
            raise ValueError(f"S2D exits must be increasing layer counts >= 1, got {self.exits}")
        if len(self.thresholds) != len(self.exits) - 1:
            raise ValueError(f"S2D needs one threshold per exit but the last: {len(self.exits) - 1} for "
                             f"exits {self.exits}, got {self.thresholds}")  # fmt: skip


def init_params(cfg: S2DConfig, final_norm: np.ndarray) -> dict:
    """Exits that start as layer-skip exits (the target's final norm, zero adapters) with confidence 0.5."""
    m, d = len(cfg.exits), cfg.hidden_size
    return {"norm": np.tile(np.asarray(final_norm, np.float32), (m, 1)),
            "adapter": np.zeros((m, d, d), np.float32), "conf_w": np.zeros((m, d), np.float32),
            "conf_b": np.zeros((m,), np.float32)}  # fmt: skip


def exit_states(params, i: int, h: Float[Array, "... D"], eps: float) -> Float[Array, "... D"]:
    """x_i of exit i from the residual stream after `exits[i]` layers (`eps`: the target's norm epsilon)."""
    n = rms_norm(h, params["norm"][i], eps)
    return n + jax.nn.silu(jnp.einsum("...d,de->...e", n, params["adapter"][i]))


def confidence(params, i: int, x: Float[Array, "... D"]) -> Float[Array, "..."]:
    return jax.nn.sigmoid(jnp.einsum("...d,d->...", x, params["conf_w"][i]) + params["conf_b"][i])


def choose_exit(conf: Float[Array, "B M"], thresholds: tuple[float, ...], running) -> Int[Array, ""]:
    """The step's exit: per row the first exit whose confidence reaches its threshold (the last
    exit if none does; `conf` holds every exit's, the last one's ignored), then the deepest any
    running row needs (0 when none runs)."""
    m = conf.shape[1]
    ok = conf[:, : m - 1] >= jnp.asarray(thresholds, conf.dtype)[None, :]
    ok = jnp.concatenate([ok, jnp.ones((conf.shape[0], 1), bool)], axis=1)
    row = jnp.argmax(ok, axis=1)
    return jnp.max(jnp.where(running, row, 0)).astype(jnp.int32)


def _truncate(params, cfg: ModelConfig, k: int):
    layers = params["layers"]
    if cfg.scan_layers:
        layers = jax.tree.map(lambda v: v[:k], layers)
    else:
        layers = list(layers[:k])
    return {"embed": params["embed"], "layers": layers}, cfg.replace(num_layers=k)


@flax.struct.dataclass
class S2DState:
    cache: KVCache  # lengths[b] = the root's slot; every layer it has holds the committed tokens
    root_x: Float[Array, "B M D"]  # each reachable exit's state at the root (M = `S2D.reach`)
    conf: Float[Array, "B M"]  # each reachable exit's confidence at the root
    exit: Int[Array, ""]  # the exit this step drafts at (index into exits)


@dataclasses.dataclass(frozen=True)
class S2D:
    """The sorted multi-exit drafter (contract: `specdec.drafter`) over `target`'s layers (its
    config: the layers' shapes). `thresholds` (per target) and `exit` (pin one exit, a layer count)
    override the config's choice."""

    cfg: S2DConfig
    target: ModelConfig | None = None  # set by the checkpoint loader (`checkpoint.load`)
    thresholds: tuple[float, ...] | None = None
    exit: int | None = None
    taps: tuple[int, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def _logits(self, params, x):
        """Target-vocabulary logits of exit states (a head trained over a draft vocabulary `d2t`
        scatters to its target ids; the rest get a large negative logit)."""
        return to_target_vocab(dense(x, params["head"]), params.get("d2t"), self.cfg.vocab_size)

    def _x(self, params, i: int, h):
        return exit_states(params, i, h, self.target.rms_norm_eps)

    @property
    def _thresholds(self) -> tuple[float, ...]:
        return tuple(self.thresholds if self.thresholds is not None else self.cfg.thresholds)

    @property
    def reach(self) -> int:
        """How many exits (the first ones) this drafter can choose: up to a pinned exit, or to the
        first whose threshold is 0 (always taken), else all; the deeper layers never run."""
        if self.exit is not None:
            return self.cfg.exits.index(self.exit) + 1
        return next((i + 1 for i, t in enumerate(self._thresholds) if t <= 0), len(self.cfg.exits))

    def _exit_index(self, conf, running) -> Int[Array, ""]:
        if self.exit is not None:
            return jnp.int32(self.cfg.exits.index(self.exit))
        return choose_exit(conf, self._thresholds[: self.reach - 1], running)

    def _catch_up(self, params, cache: KVCache, ctx: Context, block: int) -> S2DState:
        """Run the committed tokens from slot `cache.lengths` to the root (<= block of them) through
        the layers of the deepest reachable exit; score the root at every reachable exit."""
        b, exits = ctx.tokens.shape[0], self.cfg.exits[: self.reach]
        p, cfg = _truncate(params, self.target, exits[-1])
        pos = cache.lengths[:, None] + jnp.arange(block)[None, :]
        toks = jnp.take_along_axis(ctx.tokens, jnp.minimum(pos, ctx.tokens.shape[1] - 1), axis=1)
        count = ctx.lengths - cache.lengths  # tokens to run, root included (0 for finished rows)
        _, hs, cache = forward(p, cfg, toks, pos, cache, causal_mask(b, block), taps=exits, final=False)
        last = jnp.clip(count - 1, 0, block - 1)[:, None, None]
        xs = [self._x(params, i, jnp.take_along_axis(h, last, axis=1)[:, 0]) for i, h in enumerate(hs)]
        conf = jnp.stack([confidence(params, i, x) for i, x in enumerate(xs)], axis=1)
        cache = cache.advance(jnp.maximum(count - 1, 0))  # the root stays pending at slot lengths
        return S2DState(cache=cache, root_x=jnp.stack(xs, axis=1), conf=conf, exit=jnp.int32(0))

    def init(
        self, params, ctx: Context, prompt: Int[Array, "B T"], prefill_taps, cache_size: int, *, window: int
    ):
        p, cfg = _truncate(params, self.target, self.cfg.exits[self.reach - 1])
        b = prompt.shape[0]
        _, _, cache = prefill(p, cfg, prompt, KVCache.init(cfg, b, cache_size))
        return self._catch_up(params, cache.advance(ctx.lengths - 1), ctx, 1)

    def begin(self, params, state: S2DState, ctx: Context):
        i = self._exit_index(state.conf, ctx.running_rows)
        return self._logits(params, state.root_x[:, i]), state.replace(exit=i)

    def expand(self, params, state: S2DState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]):
        cache = state.cache
        toks = jnp.take_along_axis(jnp.where(tree.valid, tree.tokens, 0), frontier, axis=1)
        depth = jnp.take_along_axis(tree.depth, frontier, axis=1)
        anc = jnp.take_along_axis(ancestor_mask(tree), frontier[:, :, None], axis=1)  # [B, F, N]
        slots, pos = cache.lengths[:, None] + frontier, cache.lengths[:, None] + depth

        def at_exit(i: int):
            def run(c):
                p, cfg = _truncate(params, self.target, self.cfg.exits[i])
                _, (h,), c = forward(
                    p, cfg, toks, pos, c, anc, slots=slots, taps=(cfg.num_layers,), final=False
                )
                return self._logits(params, self._x(params, i, h)), c

            return run

        logits, cache = jax.lax.switch(state.exit, [at_exit(i) for i in range(self.reach)], cache)
        return logits, state.replace(cache=cache)

    def update(self, params, state: S2DState, ctx: Context, tree: Tree, verdict, taps):
        # The old root's KV (every layer) was written by the last catch-up; tree nodes were written
        # past it at the step's exit's layers only, and the accepted ones run again here, through all.
        return self._catch_up(params, state.cache.advance(1), ctx, tree.max_depth + 1)


# ------------------------------------------------------------------------------------ the trained family
@dataclasses.dataclass(frozen=True)
class S2DOptions:
    """specdec-train options of S2D."""

    exits: str = option(
        "4,8,12", "S2D: the exits, as layer counts of the target (increasing, comma-separated)."
    )
    conf_weight: float = option(
        0.1, "S2D: weight of the exits' confidence loss (SoFT's is the exits' mean CE)."
    )
    positions: int = option(
        128,
        "S2D / Medusa-2: answer positions per sequence the loss reads (0 = all; each costs LM heads).",
        lower_bound=0,
    )


def parse_exits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"S2D exits {text!r}: give increasing layer counts, e.g. 4,8,12") from None


def _build(opts: S2DOptions, tc, target: TrainTarget, key) -> Built:
    del key
    from specdec.train import soft  # here: the training modules import the drafter modules

    exits = parse_exits(opts.exits)
    if exits[-1] >= target.cfg.num_layers:  # (the feature cache's tap L is the normed final state)
        raise ValueError(f"S2D exits {exits}: exits sit below the target's {target.cfg.num_layers} layers")
    cfg = S2DConfig(exits=exits, thresholds=(0.5,) * (len(exits) - 1), hidden_size=target.cfg.hidden_size,
                    vocab_size=target.cfg.vocab_size)  # fmt: skip
    params = init_params(cfg, np.asarray(target.params["final_norm"], np.float32))
    loss = functools.partial(soft.soft_loss, cfg=cfg, eps=target.cfg.rms_norm_eps, loss=tc.loss,
                             tap_final=str(target.cfg.num_layers), conf_weight=opts.conf_weight,
                             positions=opts.positions)  # fmt: skip
    return Built(cfg, params, loss)


def _parse_thresholds(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split("/"))


FAMILY = Family(
    name="s2d", config=S2DConfig, drafter=S2D, options=S2DOptions, build=_build,
    shares=lambda cfg: ("embed", "head", "layers"), taps=lambda opts, num_layers: parse_exits(opts.exits),
    depth=lambda cfg: cfg.exits[-1], shipped=True,
    inference={
        "exit": InferenceOption(int, lambda d, k: dataclasses.replace(d, exit=k),
                                "{name}:exit=K (draft at the exit after K layers only)"),
        "thresholds": InferenceOption(_parse_thresholds, lambda d, t: dataclasses.replace(d, thresholds=t),
                                      "{name}:thresholds=0.7/0.6 (this target's confidence thresholds)"),
    },
)  # fmt: skip

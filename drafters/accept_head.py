"""SpecDec++ acceptance-prediction heads (arXiv 2405.19715): a draft feature -> P(token accepted).

A head reads the draft's feature at a tree node after the node's own token was consumed (EAGLE:
`state.out[b, node]` after `expand`) and predicts â(node), the probability that the node's token is
accepted given that its parent was (the one-token lag of SpecDec++: a node's estimate exists once
the node itself has been drafted on).

Architecture (as the official `wrap_model.py`): one ResBlock `x + SiLU(W x + b)` applied `layers`
times with the same weights (the official code repeats one module object, so a "3-layer" head is
one weight-tied block applied three times), then `Linear(H -> 2)`; class 1 = accepted. Params:

    res_w [H, H], res_b [H], out_w [H, 2], out_b [2]        (float32; nn.Linear's uniform init)

A head with `confidence` (an extension, not in SpecDec++) also reads the draft's own probability
q(y) of the node's token, which the parent's distribution holds and the node's feature does not:
its accept logit gets `conf_w · logit(q(y))` added (`conf_w` [], initialised to 1: the head starts
as a correction of the draft's confidence). A head with `depths` K (parallel drafters, whose draft
at depth d comes from head d or block position d: Medusa, Amphista, DFlash) adds a learned bias
`depth_b[d - 1]` [K] (zeros at init; depths past K take the last) to the accept logit: one head
shared by the depths, calibrated per depth.

Training (`specdec.train.acceptance`) uses the official weighted objective with `weight_mismatch`
w: its minimiser is the biased σ = a / (a + w (1 - a)) for a true acceptance a, a deliberately
pessimistic head. `prob` undoes that bias (logit + log w), so it returns the estimate of a itself;
`raw_prob` is the head's own σ1.

A drafter keeps one head per sampling temperature (`HeadSpec`, key "t0" for greedy with hard
labels 1[draft token == target argmax], "t1" for T = 1 with the soft labels min(1, p/q)); `pick`
chooses the head for a `SamplingConfig`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

PARAM_NAMES = ("res_w", "res_b", "out_w", "out_b")


def key_of(temperature: float) -> str:
    """The params / drafter.json key of the head trained at `temperature` ("t0", "t1", "t0.7")."""
    return f"t{temperature:g}"


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One trained head: the temperature its labels were made at (0 = greedy, hard labels), its
    weight-tied depth, the mismatch weight it was trained with (undone by `prob`), whether it also
    reads the draft's confidence q(y), how many per-depth biases it has (0: none), and the stop
    threshold h measured for it (None until a sweep records one in drafter.json)."""

    temperature: float
    layers: int = 3
    weight_mismatch: float = 6.0
    threshold: float | None = None
    confidence: bool = False
    depths: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"acceptance head temperature must be >= 0, got {self.temperature!r}")
        if self.layers < 0:
            raise ValueError(f"acceptance head layers must be >= 0, got {self.layers!r}")
        if not self.weight_mismatch > 0:
            raise ValueError(f"acceptance head weight_mismatch must be > 0, got {self.weight_mismatch!r}")
        if self.depths < 0:
            raise ValueError(f"acceptance head depths must be >= 0, got {self.depths!r}")

    @property
    def key(self) -> str:
        return key_of(self.temperature)

    @property
    def param_names(self) -> tuple[str, ...]:
        return PARAM_NAMES + (("conf_w",) if self.confidence else ()) + (("depth_b",) if self.depths else ())


def init_params(key, hidden: int, *, confidence: bool = False, depths: int = 0) -> dict:
    """Random head params (PyTorch nn.Linear's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))); with
    `confidence`, `conf_w` = 1; with `depths`, `depth_b` = 0."""
    k = jax.random.split(key, 4)
    bound = hidden**-0.5
    u = lambda kk, shape: jax.random.uniform(kk, shape, jnp.float32, -bound, bound)  # noqa: E731
    p = {"res_w": u(k[0], (hidden, hidden)), "res_b": u(k[1], (hidden,)),
         "out_w": u(k[2], (hidden, 2)), "out_b": u(k[3], (2,))}  # fmt: skip
    if confidence:
        p["conf_w"] = jnp.ones((), jnp.float32)
    if depths:
        p["depth_b"] = jnp.zeros((depths,), jnp.float32)
    return p


def _logit(q):
    q = jnp.clip(q.astype(jnp.float32), 1e-6, 1 - 1e-6)
    return jnp.log(q) - jnp.log1p(-q)


def logits(params: dict, x: Float[Array, "... H"], layers: int, conf: Float[Array, "..."] | None = None,
           depth: Int[Array, "..."] | None = None) -> Float[Array, "... 2"]:  # fmt: skip
    """The head's two logits (0 = rejected, 1 = accepted): the tied ResBlock `layers` times, then
    the output layer; a head with `conf_w` adds `conf_w · logit(conf)` (conf = q(y), required then)
    and one with `depth_b` adds `depth_b[depth - 1]` (the node's depth >= 1, required then) to the
    accept logit. f32 throughout."""
    x = x.astype(jnp.float32)
    w, b = params["res_w"].astype(jnp.float32), params["res_b"].astype(jnp.float32)
    for _ in range(layers):  # one block, applied `layers` times (weight tying)
        x = x + jax.nn.silu(jnp.dot(x, w, preferred_element_type=jnp.float32) + b)
    out_w, out_b = params["out_w"].astype(jnp.float32), params["out_b"].astype(jnp.float32)
    lg = jnp.dot(x, out_w, preferred_element_type=jnp.float32) + out_b
    if "conf_w" in params:
        if conf is None:
            raise ValueError("this acceptance head reads the draft's confidence: pass conf = q(y)")
        lg = lg.at[..., 1].add(params["conf_w"].astype(jnp.float32) * _logit(conf))
    if "depth_b" in params:
        if depth is None:
            raise ValueError("this acceptance head is calibrated per depth: pass the nodes' depths")
        db = params["depth_b"].astype(jnp.float32)
        lg = lg.at[..., 1].add(db[jnp.clip(depth - 1, 0, db.shape[0] - 1)])
    return lg


def raw_prob(params: dict, x: Float[Array, "... H"], layers: int, conf=None, depth=None
             ) -> Float[Array, "..."]:  # fmt: skip
    """The head's own σ1 = softmax(logits)[1] (biased by the training weight, see the module doc)."""
    lg = logits(params, x, layers, conf, depth)
    return jax.nn.sigmoid(lg[..., 1] - lg[..., 0])


def prob(params: dict, x: Float[Array, "... H"], spec: HeadSpec, conf=None, depth=None
         ) -> Float[Array, "..."]:  # fmt: skip
    """The predicted acceptance probability in [0, 1]: the head's logit margin plus log w, the
    inverse of the weighted objective's bias (w = 1: the head's σ1 as is). `conf`: q(y), for a
    head with `confidence`; `depth`: the nodes' depths, for a head with `depths`."""
    lg = logits(params, x, spec.layers, conf, depth)
    return jax.nn.sigmoid(lg[..., 1] - lg[..., 0] + math.log(spec.weight_mismatch))


def pick(heads: tuple[HeadSpec, ...], sampling) -> HeadSpec | None:
    """The head for `sampling` (`specdec.sampling.SamplingConfig`, static): greedy takes the T = 0
    head; T > 0 the head trained at the nearest positive temperature (labels are T-specific; a head
    for one temperature is only approximate at another, and top-k / top-p are not modelled). None
    when no head fits (a greedy-only drafter sampling at T > 0, or the reverse)."""
    if sampling.greedy:
        return next((h for h in heads if h.temperature == 0), None)
    warm = [h for h in heads if h.temperature > 0]
    if not warm:
        return None
    return min(warm, key=lambda h: abs(math.log(h.temperature / sampling.temperature)))


def specs_from_meta(accept: dict) -> tuple[HeadSpec, ...]:
    """The `HeadSpec`s of a drafter.json "accept" object ({key: {temperature, layers, weight_mismatch,
    threshold, ...}}), in key order; extra fields (training, calibration) are records only."""
    out = []
    for key in sorted(accept):
        e = accept[key]
        spec = HeadSpec(temperature=float(e["temperature"]), layers=int(e["layers"]),
                        weight_mismatch=float(e.get("weight_mismatch", 1.0)),
                        threshold=None if e.get("threshold") is None else float(e["threshold"]),
                        confidence=bool(e.get("confidence", False)),
                        depths=int(e.get("depths", 0)))  # fmt: skip
        if spec.key != key:
            raise ValueError(
                f"acceptance head {key!r} is recorded with temperature {spec.temperature} ({spec.key})"
            )
        out.append(spec)
    return tuple(out)


class AcceptanceMembers:
    """Mixin for a drafter dataclass with a field `accept_heads: tuple[HeadSpec, ...]` (set by the
    checkpoint loader; () = none): the contract's optional `acceptance` and `threshold`
    (`specdec.drafter`) from those heads, both None without heads. The drafter provides
    `_accept_input(params, state, tree, nodes) -> [B, F, H]`, what a head reads at each node once
    the node has been drafted, and `_confidence(params, state, tree, nodes, sampling) -> [B, F]`,
    q(token) of each node under `sampling` (the estimate for a temperature without a head)."""

    @property
    def acceptance(self):
        return self._acceptance if self.accept_heads else None

    @property
    def threshold(self):
        return self._threshold if self.accept_heads else None

    def _threshold(self, sampling) -> float | None:
        spec = pick(self.accept_heads, sampling)
        return None if spec is None else spec.threshold

    def _acceptance(self, params, state, ctx, tree, nodes, sampling) -> Float[Array, "B F"]:
        """â(node) in [0, 1] for `nodes` [B, F] right after `expand(..., frontier=nodes)`: the head
        trained for `sampling`'s temperature (`pick`); without one, the draft's q(token)."""
        spec = pick(self.accept_heads, sampling)
        if spec is None:
            return self._confidence(params, state, tree, nodes, sampling)
        x = self._accept_input(params, state, tree, nodes)
        conf = self._confidence(params, state, tree, nodes, sampling) if spec.confidence else None
        depth = jnp.take_along_axis(tree.depth, nodes, axis=1) if spec.depths else None
        return prob(params["accept"][spec.key], x, spec, conf, depth)

"""RAPID's retrieval-augmented target distribution (lossy for eta > 0): `Rapid(eta, alpha, residual)`.

RAPID (ICML 2025) verifies a RAG drafter's chain against the target distribution moved one
gradient step toward the drafter, where the drafter finds tokens plausible. At a node with target
distribution p and draft distribution q (both processed by the run's sampling):

    M     = 1[q >= alpha * max q]
    g     = M * (p - q)                     (the gradient of CE(q, softmax z) at z = log p)
    p_hat = softmax(log p - eta * g)
    accept the draft x with probability min(1, p_hat(x) / q(x))
    on rejection emit from  "official": norm(max(0, p - q, p - p_hat))   (RAPID's code)
                            "exact":    norm(max(0, p_hat - q))          (then the drafted
                                        positions follow p_hat exactly)
    after the whole chain is accepted, the bonus token comes from p.

eta = 0 gives p_hat = p: standard speculative sampling, lossless. eta > 0 is deliberately NOT
lossless with respect to the target (`LOSSLESS = False`, refused nowhere but labelled in every
report): with the official residual the output follows neither p nor p_hat (the seed-method notes
measure TV 0.025-0.14 to p_hat at eta = 5 on random 6-token distributions; the tests here show
the chi-square against p fails). At temperature 0, p is one-hot, so p_hat = p: greedy.
Chains only (RAPID drafts one sequence). CLI: `--verifier rapid:eta=5[,alpha=0.1,residual=exact]`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.verifiers.protocol import Verdict
from specdec.verifiers.walk import first_true, safe_norm, walk

LOSSLESS = False  # eta > 0 changes the output distribution (eta = 0 is speculative sampling)
SIBLING_MODES = ("without_replacement", "iid", "deterministic")
CHAIN_ONLY = True
RESIDUALS = ("official", "exact")


def p_hat(
    p: Float[Array, "... V"], q: Float[Array, "... V"], eta: float, alpha: float
) -> Float[Array, "... V"]:
    """The retrieval-augmented target distribution softmax(log p - eta * M * (p - q)) (module doc);
    zero wherever p is."""
    m = q >= alpha * jnp.max(q, axis=-1, keepdims=True)
    g = jnp.where(m, p - q, 0.0)
    w = jnp.where(p > 0, p * jnp.exp(-eta * g), 0.0)
    return w / jnp.sum(w, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Rapid:
    """RAPID verification of a drafted chain (module doc). Hashable: a jit static argument."""

    eta: float = 0.0
    alpha: float = 0.1
    residual: str = "official"

    SIBLING_MODES = SIBLING_MODES
    CHAIN_ONLY = CHAIN_ONLY

    def __post_init__(self):
        if self.eta < 0 or not 0.0 <= self.alpha <= 1.0 or self.residual not in RESIDUALS:
            raise ValueError(
                f"rapid needs eta >= 0, 0 <= alpha <= 1 and residual in {RESIDUALS}; got eta={self.eta}, "
                f"alpha={self.alpha}, residual={self.residual!r}"
            )

    @property
    def LOSSLESS(self) -> bool:  # noqa: N802 - the verifier modules' name for it
        return self.eta == 0.0

    @property
    def spec(self) -> str:
        out = f"rapid:eta={self.eta:g}"
        if self.alpha != 0.1:
            out += f",alpha={self.alpha:g}"
        return out + (f",residual={self.residual}" if self.residual != "official" else "")

    def __call__(
        self, tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
    ) -> Verdict:
        one_hot = tree.sibling_mode == "deterministic"  # rank-chosen drafts: q is a point mass

        def node(view):
            c = first_true(view.cand)  # a chain: one candidate per node
            x = view.tokens[jnp.maximum(c, 0)]
            q = jax.nn.one_hot(x, view.p.shape[0], dtype=view.p.dtype) if one_hot else view.q
            ph = p_hat(view.p, q, self.eta, self.alpha)
            accept = (c >= 0) & (view.coins[jnp.maximum(c, 0)] * q[x] < ph[x])
            if self.residual == "official":
                res = jnp.maximum(jnp.maximum(view.p - q, view.p - ph), 0.0)
            else:
                res = jnp.maximum(ph - q, 0.0)
            dist = jnp.where(c >= 0, safe_norm(res, view.p), view.p)
            return jnp.where(accept, c, -1), dist

        return walk(tree, target_logits, key, sampling, node)


def parse_rapid(spec: str) -> Rapid:
    """`rapid[:eta=E,alpha=A,residual=official|exact]` -> Rapid; ValueError naming the form."""
    _, _, body = spec.partition(":")
    kw: dict = {}
    for item in filter(None, body.split(",")):
        k, eq, v = (x.strip() for x in item.partition("="))
        if not eq or k not in ("eta", "alpha", "residual"):
            raise ValueError(f"bad verifier {spec!r}: use rapid:eta=5[,alpha=0.1,residual=official|exact]")
        try:
            kw[k] = v if k == "residual" else float(v)
        except ValueError:
            raise ValueError(f"bad verifier {spec!r}: {item!r} is not a number") from None
    return Rapid(**kw)

"""SpecTr K-SEQ optimal-transport draft selection (Sun et al., NeurIPS 2023) for i.i.d. drafts.

Notation here is p = target, q = draft (SpecTr's paper swaps the letters). At a node whose k
candidate drafts x_1..x_k are i.i.d. samples from q (reference notes B5.1):

    beta(rho) = sum_x min(q(x), p(x) / rho)
    rho*      = smallest rho in [1, k] with 1 - (1 - beta)^k <= rho * beta   (bisection; rho = k is valid)
    for i = 1..k: accept x_i with probability min(1, p(x_i) / (rho* q(x_i))); the first accepted wins
    P_acc     = 1 - (1 - beta)^k
    otherwise emit y ~ r,  r(y) = [p(y) - min(q(y), p(y)/rho*) * P_acc / beta] / (1 - P_acc)

P(Y = y, accepted) = min(q, p/rho)(y) * P_acc / beta, which is <= p(y) exactly when rho >= rho*, so
r is a distribution and Y ~ p. (rho = 1, "accept each draft with min(1, p/q)", is NOT valid.)

Trees: the drafts at a depth are the children of every surviving node (those whose root path equals
the accepted prefix, see `walk`), and rho* is recomputed for their number k' at every node. Given
the accepted prefix they are again i.i.d. from q, so each node is a fresh K-SEQ instance: lossless
for sibling_mode "iid" (independent draws, duplicates allowed). Needs `draft_probs`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.verifiers.protocol import Verdict
from specdec.verifiers.walk import NodeView, first_true, require_modes, safe_norm, walk

LOSSLESS = True
SIBLING_MODES = ("iid",)
_BISECTION_STEPS = 40  # interval [1, k] shrinks to k * 2^-40: far below float32 resolution


def solve_rho(p: Float[Array, " V"], q: Float[Array, " V"], k: Int[Array, ""]) -> Float[Array, ""]:
    """rho*: the smallest rho in [1, k] with 1 - (1 - beta(rho))^k <= rho * beta(rho).

    The left side decreases and the right side increases in rho, so bisection keeps `hi` valid.
    """
    kf = jnp.maximum(k, 1).astype(jnp.float32)

    def valid(rho):
        beta = jnp.sum(jnp.minimum(q, p / rho))
        return 1.0 - (1.0 - beta) ** kf <= rho * beta

    def step(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        ok = valid(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, step, (jnp.float32(1.0), kf))
    return jnp.where(valid(jnp.float32(1.0)), jnp.float32(1.0), hi)


def kseq_node(view: NodeView):
    """K-SEQ at one node over all candidates (index order); returns (child or -1, residual r)."""
    p, q = view.p, view.q
    k = jnp.sum(view.cand)
    rho = solve_rho(p, q, k)
    m = jnp.minimum(q, p / rho)
    beta = jnp.sum(m)
    p_acc = 1.0 - (1.0 - beta) ** k.astype(jnp.float32)
    p_x, q_x = p[view.tokens], q[view.tokens]
    accepted = view.cand & (p_x > 0) & (view.coins * rho * q_x < p_x)
    scale = jnp.where(beta > 0, p_acc / jnp.where(beta > 0, beta, 1.0), 0.0)
    residual = safe_norm(jnp.maximum(p - m * scale, 0.0), p)
    return first_true(accepted), residual


def spectr_verify(
    tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
) -> Verdict:
    """K-SEQ over an i.i.d. tree; needs `tree.draft_probs`. target_logits[b, i]: after node i."""
    require_modes(tree, "spectr", SIBLING_MODES)
    return walk(tree, target_logits, key, sampling, kseq_node)

"""Recursive rejection sampling (RRS) for trees whose siblings were drawn WITHOUT replacement.

At a node with target p and draft q, children x_1..x_K in the order they were drawn (B3.2):

    p_1 = p, q_1 = q
    for j = 1..K:
        accept x_j with probability min(1, p_j(x_j) / q_j(x_j)); descend into it
        p_{j+1} = norm((p_j - q_j)+)                      # the residual after a rejection
        q_{j+1} = norm(q_j with x_j zeroed)               # what the next sibling was drawn from
    emit y ~ p_{K+1}   (or the bonus y ~ p at the last accepted node)

Stage j is a standard speculative-sampling step from p_j with a draft really distributed as q_j,
and the rejection branch continues with a target that does not depend on which x_j was rejected,
so by induction the node emits exactly p; descending repeats the argument (lossless).

Sibling modes:
  "without_replacement"  the case above (Gumbel-top-k / sequential sampling, verified in draw order).
  "iid"                  repeated tokens are skipped: an i.i.d. draw that differs from the earlier
                         ones is distributed as q_j, so the scheme stays exact (without the skip a
                         repeat has q_j = 0 and an infinite ratio: badly biased).
  "deterministic"        q is one-hot: delegates to `target_only`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.verifiers.protocol import Verdict
from specdec.verifiers.target_only import target_only_verify
from specdec.verifiers.walk import NodeView, require_modes, safe_norm, sibling_loop, walk

LOSSLESS = True
SIBLING_MODES = ("deterministic", "without_replacement", "iid")


def accept(p_x: Float[Array, ""], q_x: Float[Array, ""], u: Float[Array, ""]) -> Bool[Array, ""]:
    """u < min(1, p/q) without dividing: q = 0 accepts only tokens the target allows."""
    return (p_x > 0) & (u * q_x < p_x)


def conditional_rule(
    p: Float[Array, " V"], q: Float[Array, " V"], x: Int[Array, ""], u: Float[Array, ""]
) -> tuple[Bool[Array, ""], Float[Array, " V"], Float[Array, " V"]]:
    """Sibling rule of RRS: ratio and residual with q_j; q_{j+1} conditions on x_j being taken."""
    residual = safe_norm(jnp.maximum(p - q, 0.0), p)
    return accept(p[x], q[x], u), residual, safe_norm(q.at[x].set(0.0), jnp.zeros_like(q))


def _node(view: NodeView):
    return sibling_loop(view, conditional_rule, skip_duplicates=True)


def rrs_verify(
    tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
) -> Verdict:
    """RRS over the tree; needs `tree.draft_probs` (processed with the same `sampling`) unless
    the tree is deterministic. target_logits[b, i]: raw target logits after node i."""
    if tree.sibling_mode == "deterministic":
        return target_only_verify(tree, target_logits, key, sampling)
    require_modes(tree, "rrs", SIBLING_MODES)
    return walk(tree, target_logits, key, sampling, _node)

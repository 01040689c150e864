"""SpecInfer multi-step speculative sampling (MSS) for i.i.d. siblings.

At a node with target p and draft q, children x_1..x_K drawn independently from q (B3.1;
SpecInfer Alg. 2, Thm 4.2):

    p_1 = p
    for j = 1..K:
        accept x_j with probability min(1, p_j(x_j) / q(x_j)); descend into it
        p_{j+1} = norm((p_j - q)+)        # q is NOT modified between siblings
    emit y ~ p_{K+1}   (or the bonus y ~ p at the last accepted node)

Lossless only when the children are genuine independent samples from the q used in the ratio
(sibling_mode "iid"). Siblings drawn without replacement need the conditional q of `rrs` instead
(using MSS on them is biased). Repeated tokens are fine, just wasteful.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.verifiers.protocol import Verdict
from specdec.verifiers.rrs import accept
from specdec.verifiers.walk import NodeView, require_modes, safe_norm, sibling_loop, walk

LOSSLESS = True
SIBLING_MODES = ("iid",)


def fixed_q_rule(
    p: Float[Array, " V"], q: Float[Array, " V"], x: Int[Array, ""], u: Float[Array, ""]
) -> tuple[Bool[Array, ""], Float[Array, " V"], Float[Array, " V"]]:
    """Sibling rule of MSS: ratio and residual with the unmodified q."""
    return accept(p[x], q[x], u), safe_norm(jnp.maximum(p - q, 0.0), p), q


def _node(view: NodeView):
    return sibling_loop(view, fixed_q_rule)


def specinfer_verify(
    tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
) -> Verdict:
    """MSS over an i.i.d. tree; needs `tree.draft_probs`. target_logits[b, i]: after node i."""
    require_modes(tree, "specinfer", SIBLING_MODES)
    return walk(tree, target_logits, key, sampling, _node)

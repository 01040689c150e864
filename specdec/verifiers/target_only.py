"""Target-only (one-hot draft) verification: for drafts whose q is unknown or deterministic.

At a node with target distribution p and children x_1..x_K tried in index order (B3.3):

    p_1 = p
    for j = 1..K:
        accept x_j with probability p_j(x_j)            (speculative sampling with q_j = onehot(x_j))
        on rejection p_{j+1} = norm(p_j with x_j zeroed)
    emit y ~ p_{K+1}   (or the bonus y ~ p at the last accepted node)

Equivalent to "draw Y ~ p once and accept the child equal to Y" (OPT-Tree, SGLang's single coin).
Lossless for ANY children chosen independently of the target's randomness: top-k/greedy drafts
("deterministic"), sampled drafts ("without_replacement", "iid"; a repeated token has p_j = 0 and is
simply rejected). It ignores `draft_probs`, so it is less efficient than `rrs` when the drafts are
genuine samples from a sharp q. It is what `rrs` delegates to for deterministic trees.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from specdec.sampling import SamplingConfig
from specdec.tree import SIBLING_MODES as _ALL_MODES
from specdec.tree import Tree
from specdec.verifiers.protocol import Verdict
from specdec.verifiers.walk import NodeView, safe_norm, sibling_loop, walk

LOSSLESS = True
SIBLING_MODES = _ALL_MODES


def one_hot_rule(
    p: Float[Array, " V"], q: Float[Array, " V"], x: Int[Array, ""], u: Float[Array, ""]
) -> tuple[Bool[Array, ""], Float[Array, " V"], Float[Array, " V"]]:
    """Sibling rule with q_j = onehot(x_j): accept w.p. p_j(x_j); else zero x_j and renormalise."""
    del q
    return u < p[x], safe_norm(p.at[x].set(0.0), p), jnp.zeros_like(p)


def _node(view: NodeView):
    return sibling_loop(view, one_hot_rule)


def target_only_verify(
    tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
) -> Verdict:
    """One-hot-draft tree verification; any sibling mode, `draft_probs` not needed.

    target_logits[b, i]: raw target logits after node i (processed here with `sampling`).
    """
    return walk(tree, target_logits, key, sampling, _node)

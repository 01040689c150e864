"""Standard speculative sampling for a single chain (Leviathan et al. 2023; Chen et al. 2023).

The readable reference implementation, vectorised over the chain. With drafts x_1..x_g, where
x_{i+1} was drawn from q_i = draft_probs[:, i] and p_i = probabilities(target_logits[:, i]):

    accept x_{i+1} with probability min(1, p_i(x_{i+1}) / q_i(x_{i+1})), i = 0, 1, ... in order
    at the first rejection (at node n): emit y ~ norm((p_n - q_n)+) and stop
    if all drafts are accepted: emit the bonus y ~ p_g

P(y) = min(p, q)(y) + (p - q)+(y) = p(y) at every position, so the output is exactly the target's.

REQUIRES a chain in `Tree.chain` layout: node i's parent is i - 1. A node that breaks the layout
ends the chain there (it and everything after it is ignored); use `rrs` for branching trees (on a
chain it computes the same thing). sibling_mode "deterministic" means q is one-hot (greedy drafts),
which makes this target-only verification; otherwise `draft_probs` are required.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from specdec.sampling import SamplingConfig, probabilities
from specdec.tree import Tree
from specdec.verifiers import walk as tree_walk
from specdec.verifiers.protocol import Verdict
from specdec.verifiers.walk import chain_drafts, chain_verdict, require_modes, safe_norm

LOSSLESS = True
SIBLING_MODES = ("deterministic", "without_replacement", "iid")


def speculative_verify(
    tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
) -> Verdict:
    """Leviathan/Chen verification of the chain tree.tokens[:, 1:]; see the module docstring."""
    require_modes(tree, "speculative", SIBLING_MODES)
    b, n, v = target_logits.shape
    coins, emit_u = tree_walk.uniforms(key, b, n)  # the same coins the tree verifiers use
    p = probabilities(target_logits, sampling)  # [B, N, V]
    x, links, q = chain_drafts(tree, v)  # x[:, i] was drawn at node i, from q[:, i]
    take = lambda a: jnp.take_along_axis(a, x[..., None], axis=-1)[..., 0]
    p_x, q_x = take(p[:, :-1]), take(q)
    coins = coins[:, 1:]  # the coin of node i + 1
    accepted = links & (p_x > 0) & (coins * q_x < p_x)
    n_acc = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1).astype(jnp.int32)

    rows = jnp.arange(b)
    p_n = p[rows, n_acc]
    stop = jnp.minimum(n_acc, n - 2)  # q/links index of the draft that was rejected (if any)
    if n > 1:
        rejected = (n_acc < n - 1) & links[rows, stop]
        residual = jax.vmap(safe_norm)(jnp.maximum(p_n - q[rows, stop], 0.0), p_n)
        dist = jnp.where(rejected[:, None], residual, p_n)
    else:  # a lone root: only the bonus token
        dist = p_n
    return chain_verdict(n_acc, dist, emit_u, sampling, tree.max_depth)

"""Block verification (Sun et al., "Block Verification Accelerates Speculative Decoding", ICLR
2025): a lossless chain verifier that accepts at least as many tokens as token-by-token speculative
sampling: P(tau >= i) = E_q[w_i] >= E_q[prod_j min(1, r_j)], so its accepted length stochastically
dominates over the drafts' randomness (not draft by draft).

For a drafted chain X_1..X_n with draft laws q_i and target laws p_i (p_{n+1}: the bonus position):

    r_i = p_i(X_i) / q_i(X_i)
    w_0 = 1,  w_i = min(1, w_{i-1} r_i)                   (log w_i = S_i - max_{s<=i} S_s, S = cumsum log r)
    R_t = max(w_t p_{t+1} - q_{t+1}, 0),  Z_t = sum R_t  (the weighted residual after t accepted)
    h_i = Z_i / (Z_i + 1 - w_i) for i < n,  h_n = w_n     (1 where the denominator vanishes)
    tau = the LAST i with eta_i < h_i (0 if none), eta_i ~ U[0, 1) independent
    emit X_1..X_tau, then Y ~ R_tau / Z_tau if tau < n, else Y ~ p_{n+1}.

Three differences from token verification, each needed (a half-conversion is biased): the capped
running weight instead of the per-token ratio, the longest passing prefix instead of the prefix
before the first failure, and the weighted residual. At temperature 0 or with one-hot drafts (top-k
or lookup drafters: sibling mode "deterministic") it accepts exactly what token verification
accepts; the gain needs sampled drafts at temperature > 0 (`chain:K,sample`). Chains only: a tree
with siblings is refused before compiling (`CHAIN_ONLY`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from specdec.sampling import SamplingConfig, probabilities
from specdec.tree import Tree
from specdec.verifiers import walk as tree_walk
from specdec.verifiers.greedy import greedy_verify
from specdec.verifiers.protocol import Verdict
from specdec.verifiers.walk import chain_drafts, chain_verdict, require_modes, safe_norm

LOSSLESS = True
SIBLING_MODES = ("deterministic", "without_replacement", "iid")  # one child per node: a draw from q
CHAIN_ONLY = True  # one drafted block: `specdec.compose` refuses a builder with siblings


def longest_passing(passed: Bool[Array, "B G"]) -> Int[Array, " B"]:
    """tau: the longest prefix whose coin passed (`passed[:, i - 1]`: prefix length i), 0 if none.
    Not the prefix before the first failure: a longer prefix may pass after a shorter one failed."""
    lengths = jnp.arange(1, passed.shape[1] + 1)[None, :]
    return jnp.max(jnp.where(passed, lengths, 0), axis=1).astype(jnp.int32)


def block_verify(
    tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
) -> Verdict:
    """Block verification of the chain `tree.tokens[:, 1:]` (see the module docstring)."""
    if sampling.greedy:  # w_i is 0 or 1: the accepted prefix is greedy verification's
        return greedy_verify(tree, target_logits, key, sampling)
    require_modes(tree, "block", SIBLING_MODES)
    b, n, v = target_logits.shape
    coins, emit_u = tree_walk.uniforms(key, b, n)
    p = probabilities(target_logits, sampling)  # [B, N, V]: p[:, i] is the target law after node i
    x, links, q = chain_drafts(tree, v)  # x[:, i] = X_{i+1}, drafted at node i from q[:, i] = q_{i+1}
    count = jnp.sum(links, axis=1)  # n per row (drafts that exist)
    take = lambda a: jnp.take_along_axis(a, x[..., None], axis=-1)[..., 0]  # noqa: E731
    log_r = jnp.where(links, jnp.log(take(p[:, :-1])) - jnp.log(take(q)), 0.0)  # [B, n-1]
    s = jnp.concatenate([jnp.zeros((b, 1)), jnp.cumsum(log_r, axis=1)], axis=1)  # S_0..S_{n-1}
    log_w = s - jax.lax.cummax(s, axis=1)  # [B, n]: log w_0..log w_{n-1}; -inf once p(X) = 0
    w = jnp.exp(log_w)
    residual = jnp.maximum(w[:, :-1, None] * p[:, :-1] - q, 0.0)  # R_0..R_{n-2}: [B, n-1, V]
    z = jnp.sum(residual, axis=-1)  # Z_0..Z_{n-2}
    i = jnp.arange(1, n)[None, :]  # the prefix lengths 1..n-1 (static chain length)
    z_next = jnp.concatenate([z[:, 1:], jnp.zeros((b, 1))], axis=1)  # Z_i for prefix i
    denom = z_next - jnp.expm1(log_w[:, 1:])  # Z_i + 1 - w_i
    h = jnp.where(denom > 0, z_next / jnp.where(denom > 0, denom, 1.0), 1.0)
    h = jnp.where(i == count[:, None], w[:, 1:], h)  # the last draft: h_n = w_n
    h = jnp.where(i <= count[:, None], h, 0.0)  # past the chain: never accepted
    passed = coins[:, 1:] < h  # eta_i: node i's own coin
    tau = longest_passing(passed)

    rows = jnp.arange(b)
    bonus = p[rows, tau]  # the target law after node tau
    if n > 1:
        stop = jnp.minimum(tau, n - 2)
        corrected = jax.vmap(safe_norm)(residual[rows, stop], bonus)
        dist = jnp.where((tau < count)[:, None], corrected, bonus)
    else:  # a lone root: only the bonus token
        dist = bonus
    return chain_verdict(tau, dist, emit_u, sampling, tree.max_depth)

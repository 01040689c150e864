"""Helpers shared by the tree builders: child selection (top-k / Gumbel-top-k) and node writes.

Every builder drafts the same way: take the drafter's logits at a set of nodes, turn them into the
draft distribution under the run's `SamplingConfig`, choose k children per node, and write those
children into the tree arrays. The pieces here keep that identical across builders, so the
verifier-facing invariants (PAD at invalid nodes, draft_probs = `probabilities(logits, sampling)`,
children in drafting order) hold by construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from specdec.sampling import SamplingConfig, probabilities, process_logits
from specdec.tree import PAD, Tree


def draft_logprobs(logits: Float[Array, "... V"], sampling: SamplingConfig) -> Float[Array, "... V"]:
    """log q used to rank and score children.

    At temperature 0 the sampled "distribution" is one-hot, useless for ranking, so this is the
    raw `log_softmax` (as EAGLE-2 scores its tree). At temperature > 0 it is the log of the
    processed distribution: tokens removed by top-k/top-p get -inf and are never drafted.
    """
    x = logits.astype(jnp.float32) if sampling.greedy else process_logits(logits, sampling)
    return jax.nn.log_softmax(x, axis=-1)


def select_children(
    key: PRNGKeyArray | None,
    logits: Float[Array, "... V"],
    sampling: SamplingConfig,
    k: int,
    sample: bool,
) -> tuple[Int[Array, "... K"], Float[Array, "... K"], Float[Array, "... K"], Bool[Array, "... K"]]:
    """Choose k children per row of `logits`, in drafting order.

    Returns `(tokens, logq, keys, ok)`: `logq` = `draft_logprobs` of each child; `keys` = the values
    the children were ranked by (log q, or log q + Gumbel noise when sampling); `ok` = the child
    is a real draft (finite key; False when fewer than k tokens have mass).

    `sample` (only at temperature > 0) draws k tokens without replacement by Gumbel-top-k: the
    order of the perturbed keys is the sequential sampling order, which the verifier relies on.
    Otherwise children are the deterministic top-k by rank (ties: lower token id first).
    """
    v = logits.shape[-1]
    if k > v:
        raise ValueError(f"cannot draft {k} children from a vocabulary of {v}")
    lp = draft_logprobs(logits, sampling)
    if sample and not sampling.greedy:
        ranked = lp + jax.random.gumbel(key, lp.shape, jnp.float32)
    else:
        ranked = lp
    keys, tokens = jax.lax.top_k(ranked, k)
    logq = jnp.take_along_axis(lp, tokens, axis=-1)
    return tokens.astype(jnp.int32), logq, keys, jnp.isfinite(keys)


def take_rows(x: Array, idx: Int[Array, "B M"]) -> Array:
    """x[b, idx[b, m], ...] for a per-row gather along axis 1 (x is [B, N, ...])."""
    return x[jnp.arange(x.shape[0])[:, None], idx]


def set_rows(x: Array, idx: Int[Array, "B M"], values: Array) -> Array:
    """x with x[b, idx[b, m], ...] = values[b, m, ...] (a per-row scatter along axis 1)."""
    return x.at[jnp.arange(x.shape[0])[:, None], idx].set(values)


def add_nodes(
    tree: Tree,
    slots: Int[Array, "B M"],
    tokens: Int[Array, "B M"],
    parents: Int[Array, "B M"],
    ok: Bool[Array, "B M"],
) -> Tree:
    """Write M nodes per row at `slots` (distinct per row) with the given tokens and parents.

    A node is valid iff `ok` and its parent is a valid node; depth = parent depth + 1. Invalid
    nodes get `tokens = PAD`, `parents = -1`, `depth = 0`, as `Tree` requires. `parents < 0` is
    only allowed for invalid nodes (the index is clamped before it is read).
    """
    safe_par = jnp.maximum(parents, 0)
    valid = ok & (parents >= 0) & take_rows(tree.valid, safe_par)
    depth = take_rows(tree.depth, safe_par) + 1
    return tree.replace(
        tokens=set_rows(tree.tokens, slots, jnp.where(valid, tokens, PAD).astype(jnp.int32)),
        parents=set_rows(tree.parents, slots, jnp.where(valid, parents, -1).astype(jnp.int32)),
        depth=set_rows(tree.depth, slots, jnp.where(valid, depth, 0).astype(jnp.int32)),
        valid=set_rows(tree.valid, slots, valid),
    )


def record_probs(
    probs: Float[Array, "B N V"],
    slots: Int[Array, "B F"],
    logits: Float[Array, "B F V"],
    sampling: SamplingConfig,
) -> Float[Array, "B N V"]:
    """Store `probabilities(logits, sampling)` (what the verifier compares with) at `slots`."""
    return set_rows(probs, slots, probabilities(logits, sampling))


def zero_probs(b: int, n: int, v: int) -> Float[Array, "B N V"]:
    """An all-zero draft_probs buffer (unexpanded nodes keep zeros)."""
    return jnp.zeros((b, n, v), jnp.float32)


def sibling_mode(sample: bool, sampling: SamplingConfig) -> str:
    """How children were drawn: Gumbel-top-k only when asked for and temperature > 0."""
    return "without_replacement" if sample and not sampling.greedy else "deterministic"


def split_keys(key: PRNGKeyArray, n: int) -> list[PRNGKeyArray]:
    """n independent keys (fresh noise per drafting round, never reused across rounds)."""
    return list(jax.random.split(key, max(n, 1)))

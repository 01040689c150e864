"""A candidate pool for dynamic trees (EAGLE-2, DySpec): draft many candidates, keep the best.

Layout. The pool holds C entries per row: entry 0 is the root, and every expansion of M nodes
appends their top-k children (M*k entries, in frontier order, siblings by draft rank) at a static
offset. Entries are therefore in topological order (a parent's entry precedes its children's)
and siblings are contiguous in rank order. `score` is the cumulative draft log-prob of the path
(-inf for empty or impossible entries).

Working tree. Only expanded entries are shown to the drafter: the k-th expanded entry gets
working slot k of a `Tree` with W slots (slot 0 = root), written when it is expanded. A drafter
with a KV cache over tree nodes therefore writes at most W slots; candidates that are never
expanded cost no drafter slot. `wprobs[b, slot]` = the processed draft distribution there.

Finalize. The compact tree is the root plus the best N-1 entries by score (ties: lower entry
first, so a parent beats a child with an equal score), in entry order, reindexed; draft_probs
copied from the working slots (zeros at unexpanded leaves).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from specdec.context import Context
from specdec.drafter import Drafter, DraftState
from specdec.sampling import SamplingConfig
from specdec.tree import PAD, Tree, ancestor_closed
from specdec.trees.topk import add_nodes, record_probs, select_children, set_rows, take_rows, zero_probs


@flax.struct.dataclass
class Pool:
    tokens: Int[Array, "B C"]  # PAD for empty entries
    parents: Int[Array, "B C"]  # parent entry; -1 for the root and empty entries
    depth: Int[Array, "B C"]
    score: Float[Array, "B C"]  # cumulative draft log-prob; -inf for empty / impossible
    slot: Int[Array, "B C"]  # working slot once expanded, else -1
    wtree: Tree  # working tree over W slots (expanded entries only), shown to the drafter
    wprobs: Float[Array, "B W V"]  # draft distribution at each working slot


def _append(pool: Pool, base, tokens, parents, depth, score) -> Pool:
    """Write a block of entries [B, m] at entry offset `base` (a static or traced int)."""
    upd = lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v.astype(x.dtype), base, axis=1)
    return pool.replace(
        tokens=upd(pool.tokens, tokens),
        parents=upd(pool.parents, parents),
        depth=upd(pool.depth, depth),
        score=upd(pool.score, score),
    )


def _add_children(pool: Pool, base, entries, logits, sampling: SamplingConfig, k: int) -> Pool:
    """Append the top-k children of `entries` [B, M] (whose draft logits are [B, M, V]) at `base`."""
    b, m = entries.shape
    toks, logq, _, _ = select_children(None, logits, sampling, k, sample=False)
    score = take_rows(pool.score, entries)[..., None] + logq  # -inf parent or child stays -inf
    depth = jnp.broadcast_to(take_rows(pool.depth, entries)[..., None] + 1, (b, m, k))
    par = jnp.broadcast_to(entries[..., None], (b, m, k))
    flat = lambda x: x.reshape(b, m * k)
    return _append(pool, base, flat(toks), flat(par), flat(depth), flat(score))


def init_pool(
    root: Int[Array, " B"],
    logits: Float[Array, "B V"],
    sampling: SamplingConfig,
    capacity: int,
    window: int,
    max_depth: int,
    k: int,
) -> Pool:
    """A pool holding the root (expanded at slot 0 with `logits` from `begin`) and its top-k children."""
    b, v = logits.shape
    pool = Pool(
        tokens=jnp.full((b, capacity), PAD, jnp.int32).at[:, 0].set(root),
        parents=jnp.full((b, capacity), -1, jnp.int32),
        depth=jnp.zeros((b, capacity), jnp.int32),
        score=jnp.full((b, capacity), -jnp.inf, jnp.float32).at[:, 0].set(0.0),
        slot=jnp.full((b, capacity), -1, jnp.int32).at[:, 0].set(0),
        wtree=Tree.empty(root, window, max_depth),
        wprobs=zero_probs(b, window, v),
    )
    zeros = jnp.zeros((b, 1), jnp.int32)
    pool = pool.replace(wprobs=record_probs(pool.wprobs, zeros, logits[:, None], sampling))
    return _add_children(pool, 1, zeros, logits[:, None], sampling, k)


def expand_entries(
    drafter: Drafter,
    params,
    state: DraftState,
    ctx: Context,
    pool: Pool,
    entries: Int[Array, "B M"],
    slot0,
    base,
    sampling: SamplingConfig,
    k: int,
) -> tuple[Pool, DraftState]:
    """Expand pool `entries` (distinct, not yet expanded, parents expanded) in one drafter call.

    They take working slots `slot0 .. slot0+M-1`; their top-k children are appended at entry
    offset `base`. `slot0` and `base` may be traced (for `lax.fori_loop` rounds). Entries with a
    -inf score are written as invalid working nodes (the drafter still sees them in the frontier;
    their outputs are discarded because their children keep a -inf score).
    """
    b, m = entries.shape
    slots = jnp.broadcast_to(slot0 + jnp.arange(m, dtype=jnp.int32), (b, m))
    par_entry = take_rows(pool.parents, entries)
    par_slot = jnp.where(par_entry >= 0, take_rows(pool.slot, jnp.maximum(par_entry, 0)), -1)
    wtree = add_nodes(
        pool.wtree,
        slots,
        take_rows(pool.tokens, entries),
        par_slot,
        jnp.isfinite(take_rows(pool.score, entries)),
    )
    pool = pool.replace(wtree=wtree, slot=set_rows(pool.slot, entries, slots))
    logits, state = drafter.expand(params, state, ctx, wtree, slots)
    pool = pool.replace(wprobs=record_probs(pool.wprobs, slots, logits, sampling))
    return _add_children(pool, base, entries, logits, sampling, k), state


def finalize(pool: Pool, num_nodes: int, max_depth: int) -> Tree:
    """The compact tree: root + best `num_nodes - 1` entries by score, in entry (topological) order.

    Ancestor closure holds by construction (a child's score <= its parent's, ties go to the lower
    entry) and is enforced again explicitly: a node whose parent was not selected is invalid.
    """
    b, _ = pool.score.shape
    _, idx = jax.lax.top_k(pool.score[:, 1:], num_nodes - 1)  # stable: ties -> lower entry
    sel = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.sort(idx + 1, axis=-1)], axis=1)
    rows = jnp.arange(b)[:, None]
    inv = jnp.full(pool.score.shape, -1, jnp.int32).at[rows, sel].set(jnp.arange(num_nodes))
    par_entry = take_rows(pool.parents, sel)
    parents = jnp.where(par_entry >= 0, take_rows(inv, jnp.maximum(par_entry, 0)), -1)
    is_root = jnp.arange(num_nodes) == 0
    ok = is_root | (jnp.isfinite(take_rows(pool.score, sel)) & (parents >= 0))
    ok = ancestor_closed(ok, parents, max_depth)  # a node is valid only if its whole path is
    slot = take_rows(pool.slot, sel)
    probs = take_rows(pool.wprobs, jnp.maximum(slot, 0))
    return Tree(
        tokens=jnp.where(ok, take_rows(pool.tokens, sel), PAD),
        parents=jnp.where(ok, parents, -1),
        depth=jnp.where(ok, take_rows(pool.depth, sel), 0),
        valid=ok,
        draft_probs=jnp.where((ok & (slot >= 0))[..., None], probs, 0.0),
        max_depth=max_depth,
        sibling_mode="deterministic",
        score=jnp.where(ok, take_rows(pool.score, sel), -jnp.inf),
    )

"""Structural invariants of draft trees and of the decode loop, checkable under jit.

A tree that breaks one of these would send a negative index into a gather, attend a node to the
wrong ancestors or write KV outside the cache; on an accelerator that is undefined behaviour, not
an error. `tree_violations` computes, per row, the first broken invariant as a code (0: none) with
array ops only, so the decode loop can run it every step (`generate(..., check=True)`) and stop
with the step and row; `check_tree` is the eager form that raises.

Tree invariants (`TREE`), for every row:
  root       node 0 is valid and has depth 0
  parent     a valid non-root node's parent index is in [0, i): parents precede children, and no
             negative index reaches a gather
  ancestry   a valid node's parent is valid (validity is closed under ancestry)
  depth      depth = parent depth + 1, and at most `tree.max_depth`
  token      a valid node's token is in [0, vocab)
  cache      the block fits the cache: `cache_length + num_nodes <= cache_size` (nodes are written
             at slots `cache_length + i`; positions `cache_length + depth` stay inside it)
  probs      `draft_probs` of a node with a valid child is a distribution (>= 0, sums to 1 +- 1e-3)
Loop invariants (`LOOP`), checked after every step:
  frozen     a row that had finished neither committed KV nor tokens
  lengths    a running row's cache holds every committed token but the root (`cache = length - 1`)
  budget     no row emitted more than max_new tokens
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from specdec.tree import Tree

TREE = ("root", "parent", "ancestry", "depth", "token", "cache", "probs")
LOOP = ("frozen", "lengths", "budget")
CODES = (None,) + TREE + LOOP  # code k > 0 names CODES[k]

EXPLAIN = {
    "root": "node 0 (the root) must be valid at depth 0",
    "parent": "a valid node's parent must be an earlier node (0 <= parent < index)",
    "ancestry": "a valid node's parent must be valid",
    "depth": "a node's depth must be its parent's + 1 and at most the tree's max_depth",
    "token": "a valid node's token must be a vocabulary id",
    "cache": "the tree block does not fit the KV cache (cache_length + num_nodes > cache_size)",
    "probs": "draft_probs of a node with children must be a probability distribution",
    "frozen": "a finished row committed KV or tokens",
    "lengths": "a running row's cache length is not its committed length - 1",
    "budget": "a row emitted more than max_new_tokens",
}


def _first(*conds: Bool[Array, " B"]) -> Int[Array, " B"]:
    """Per row, 1 + the index of the first true condition in `conds` order, or 0."""
    code = jnp.zeros(conds[0].shape, jnp.int32)
    for k in reversed(range(len(conds))):
        code = jnp.where(conds[k], k + 1, code)
    return code


def tree_violations(
    tree: Tree, vocab_size: int, cache_lengths: Int[Array, " B"] | None = None, cache_size: int | None = None
) -> Int[Array, " B"]:
    """Per row, the code of the first broken tree invariant (`CODES[code]`, in `TREE` order); 0: none."""
    b, n = tree.tokens.shape
    idx = jnp.arange(n)[None, :]
    valid, par = tree.valid, tree.parents
    nonroot = valid & (idx > 0)
    safe_par = jnp.clip(par, 0, n - 1)
    par_valid = jnp.take_along_axis(valid, safe_par, axis=1)
    par_depth = jnp.take_along_axis(tree.depth, safe_par, axis=1)
    root = ~valid[:, 0] | (tree.depth[:, 0] != 0)
    parent = jnp.any(nonroot & ((par < 0) | (par >= idx)), axis=1)
    ancestry = jnp.any(nonroot & ~par_valid, axis=1)
    depth = jnp.any(nonroot & (tree.depth != par_depth + 1), axis=1) | jnp.any(
        valid & (tree.depth > tree.max_depth), axis=1
    )
    token = jnp.any(valid & ((tree.tokens < 0) | (tree.tokens >= vocab_size)), axis=1)
    cache = jnp.zeros((b,), bool)
    if cache_lengths is not None and cache_size is not None:
        cache = cache_lengths + n > cache_size
    probs = jnp.zeros((b,), bool)
    if tree.draft_probs is not None:
        has_child = jnp.any((par[:, None, :] == idx[:, :, None]) & nonroot[:, None, :], axis=2)  # [B, N]
        q = tree.draft_probs
        bad = (jnp.abs(jnp.sum(q, -1) - 1.0) > 1e-3) | jnp.any(q < 0, -1) | ~jnp.all(jnp.isfinite(q), -1)
        probs = jnp.any(has_child & valid & bad, axis=1)
    return _first(root, parent, ancestry, depth, token, cache, probs)


def check_tree(
    tree: Tree, vocab_size: int, cache_lengths=None, cache_size: int | None = None, *, where: str = ""
) -> None:
    """Raise ValueError naming the first broken invariant and its row (eager; see the module doc)."""
    codes = np.asarray(tree_violations(tree, vocab_size, cache_lengths, cache_size))
    bad = np.flatnonzero(codes)
    if bad.size:
        row = int(bad[0])
        name = CODES[int(codes[row])]
        raise ValueError(f"{where}row {row}: tree invariant '{name}' broken: {EXPLAIN[name]}")


def loop_violations(
    before_done: Bool[Array, " B"],
    before_cache: Int[Array, " B"],
    before_length: Int[Array, " B"],
    cache_lengths: Int[Array, " B"],
    length: Int[Array, " B"],
    generated: Int[Array, " B"],
    max_new: Int[Array, ""],
) -> Int[Array, " B"]:
    """Per row, the code of the first broken loop invariant after a step (`CODES`); 0: none."""
    frozen = before_done & ((cache_lengths != before_cache) | (length != before_length))
    running = ~before_done
    lengths = running & (before_cache != before_length - 1)
    budget = generated > max_new
    code = _first(frozen, lengths, budget)
    return jnp.where(code > 0, code + len(TREE), 0)

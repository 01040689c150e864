"""Dynamic trees (EAGLE-2, DySpec) on the toy drafter of `test_trees`, against numpy references."""

from __future__ import annotations

import heapq

import jax.numpy as jnp
import numpy as np
import pytest

from specdec.sampling import SamplingConfig
from specdec.trees import DynamicTree, DySpecTree
from tests.test_trees import (
    GREEDY,
    MAXD,
    ROOTS,
    V,
    assert_children_are_top_ranks,
    build,
    check_tree,
    make_table,
    token_paths,
)


def ref_eagle2(table, root, depth, k, n):
    """EAGLE-2 topK_genrate in numpy (float64): beam by cumulative log-prob, rerank to n-1."""
    lsm = table - np.log(np.exp(table).sum(-1, keepdims=True))
    level = [((int(t),), lsm[0, root, t]) for t in np.argsort(-lsm[0, root])[:k]]
    cands = list(level)
    for _ in range(depth - 1):
        nxt = []
        for path, s in sorted(level, key=lambda c: -c[1])[:k]:
            lp = lsm[len(path), path[-1]]
            nxt += [(path + (int(t),), s + lp[t]) for t in np.argsort(-lp)[:k]]
        cands, level = cands + nxt, nxt
    return {p for p, _ in sorted(cands, key=lambda c: -c[1])[: n - 1]}


def ref_dyspec(table, root, n, k, per_call, rounds):
    """DySpec pool in numpy: each round expands the per_call best unexpanded candidates."""
    lsm = table - np.log(np.exp(table).sum(-1, keepdims=True))

    def kids(path, s):
        lp = lsm[len(path), path[-1] if path else root]
        return [(path + (int(t),), s + lp[t]) for t in np.argsort(-lp)[:k]]

    pool, expanded = kids((), 0.0), set()
    for _ in range(rounds):
        best = sorted((c for c in pool if c[0] not in expanded), key=lambda c: -c[1])[:per_call]
        for path, s in best:
            expanded.add(path)
            pool += kids(path, s)
    return {p for p, _ in sorted(pool, key=lambda c: -c[1])[: n - 1]}


def ref_best_first(table, root, n, k):
    """Exact greedy: pop the most probable path n-1 times, pushing each popped node's top-k."""
    lsm = table - np.log(np.exp(table).sum(-1, keepdims=True))
    heap, out = [(-lsm[0, root, t], (int(t),)) for t in np.argsort(-lsm[0, root])[:k]], set()
    heapq.heapify(heap)
    while len(out) < n - 1:
        s, path = heapq.heappop(heap)
        out.add(path)
        lp = lsm[len(path), path[-1]]
        for t in np.argsort(-lp)[:k]:
            heapq.heappush(heap, (s - lp[t], path + (int(t),)))
    return out


@pytest.mark.parametrize("builder", [DynamicTree(5, 4, 24), DynamicTree(3, 3, 13)], ids=lambda b: b.spec)
def test_dynamic_matches_eagle2_reference(builder):
    tree, audit, table = build(builder, ROOTS, seed=1)
    check_tree(tree, builder, table, GREEDY, audit)
    assert tree.valid.all() and tree.sibling_mode == "deterministic"
    assert_children_are_top_ranks(tree, table)
    assert audit["calls"] == builder.depth - 1
    for r, root in enumerate(ROOTS):
        assert token_paths(tree, r) == ref_eagle2(table, root, builder.depth, builder.topk, builder.num_nodes)


@pytest.mark.parametrize("builder", [DynamicTree(4, 3, 20), DySpecTree(10, topk=3)], ids=lambda b: b.spec)
def test_dynamic_selection_is_ancestor_closed_under_ties(builder):
    """A certain rank-0 child (log q == 0.0 exactly) ties its parent's score; the parent must win."""
    table = np.zeros((MAXD, V, V), np.float32)
    table[:, :, 5] = 200.0  # below the root every node's top token is 5 with probability 1
    table[0] = np.asarray(make_table(10)[0])
    tree, audit, table = build(builder, ROOTS, table=jnp.asarray(table))
    check_tree(tree, builder, table, GREEDY, audit)
    assert tree.valid.all()
    assert_children_are_top_ranks(tree, table)


def test_dynamic_with_truncated_sampling_stays_well_formed():
    builder = DynamicTree(4, 3, 30)
    # 2 finite children per node; the frontier of 3 holds at most 2, then 3 finite nodes per round
    s = SamplingConfig(temperature=0.7, top_k=2)
    tree, audit, table = build(builder, ROOTS, s, seed=2)
    check_tree(tree, builder, table, s, audit, strict=False)
    assert (tree.valid.sum(1) == 1 + 2 + 4 + 6 + 6).all()


@pytest.mark.parametrize(
    "builder", [DySpecTree(12, topk=4), DySpecTree(20, topk=5, per_call=3)], ids=lambda b: b.spec
)
def test_dyspec_is_greedy_by_path_probability(builder):
    tree, audit, table = build(builder, ROOTS, seed=3)
    check_tree(tree, builder, table, GREEDY, audit)
    assert tree.valid.all() and audit["calls"] == builder.rounds
    assert_children_are_top_ranks(tree, table)
    for r, root in enumerate(ROOTS):
        args = (table, root, builder.num_nodes, builder.topk)
        assert token_paths(tree, r) == ref_dyspec(*args, builder.per_call, builder.rounds)
        if builder.per_call == 1:
            assert token_paths(tree, r) == ref_best_first(*args)

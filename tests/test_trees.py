"""Tree builders on a toy drafter: static trees, RSD sampling correctness, jit, parsing.

The toy drafter's next-token logits after a node are `table[depth, token]` (a fixed random table),
so every builder's output can be recomputed in numpy. It also audits the builder through its
state: every `expand` must name in-window slots of valid nodes whose parents were already
drafted, and never the same node twice. Dynamic trees: `test_trees_dynamic.py`.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from specdec.context import Context
from specdec.sampling import SamplingConfig, probabilities
from specdec.tree import PAD, ancestor_mask, child_mask, positions, root_paths
from specdec.trees import (
    EAGLE1_25,
    MEDUSA_63,
    DynamicTree,
    DySpecTree,
    RSDBeamTree,
    RSDTree,
    StaticTree,
    chain,
    parse_tree,
)
from specdec.trees import check_tree as public_check_tree

V = 24
MAXD = 16
GREEDY = SamplingConfig()
HOT = SamplingConfig(temperature=0.9)


@dataclasses.dataclass(frozen=True)
class ToyDrafter:
    """Drafter protocol over a logits table [MAXD, V, V]; the state audits the builder's calls."""

    window: int
    vocab_size: int = V
    taps: tuple[int, ...] = ()

    def init(self, params, ctx, prefill_taps=(), cache_size=0):
        zero = jnp.zeros((), jnp.int32)
        count = jnp.zeros((ctx.lengths.shape[0], self.window), jnp.int32)
        return dict(count=count, out_of_window=zero, invalid=zero, orphan=zero, repeated=zero, calls=zero)

    def _logits(self, params, tokens, depth):
        return params[jnp.clip(depth, 0, params.shape[0] - 1), jnp.clip(tokens, 0, params.shape[1] - 1)]

    def begin(self, params, state, ctx):
        logits = self._logits(params, ctx.root, jnp.zeros_like(ctx.root))
        return logits, {**state, "count": state["count"].at[:, 0].add(1)}

    def expand(self, params, state, ctx, tree, frontier):
        assert tree.num_nodes <= self.window, "the working tree is larger than the builder's window"
        rows = jnp.arange(frontier.shape[0])[:, None]
        at = lambda x: x[rows, frontier]
        count = state["count"]
        checks = dict(
            out_of_window=jnp.sum((frontier < 0) | (frontier >= self.window)),
            invalid=jnp.sum(~at(tree.valid)),
            orphan=jnp.sum(at(tree.valid) & (count[rows, jnp.maximum(at(tree.parents), 0)] == 0)),
            repeated=jnp.sum(count[rows, frontier] > 0),
            calls=1,
        )
        state = {**state, "count": count.at[rows, frontier].add(1)}
        state.update({k: state[k] + v for k, v in checks.items()})
        return self._logits(params, at(tree.tokens), at(tree.depth)), state


def make_table(seed: int, v: int = V, scale: float = 2.0) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), (MAXD, v, v), jnp.float32) * scale


def make_ctx(roots) -> Context:
    """A context whose rows have different lengths; the root is the last committed token."""
    roots = np.asarray(roots, np.int32)
    lengths = 2 + np.arange(len(roots)) % 3
    tokens = np.zeros((len(roots), 8), np.int32)
    tokens[np.arange(len(roots)), lengths - 1] = roots
    return Context(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths, jnp.int32))


TRACES = []


@partial(jax.jit, static_argnames=("builder", "drafter", "sampling"))
def _build(builder, drafter, params, ctx, key, sampling):
    TRACES.append(builder)
    state = drafter.init(params, ctx)
    return builder(drafter, params, state, ctx, key, sampling)


def build(builder, roots, sampling=GREEDY, seed=0, table=None, key=0):
    table = make_table(seed) if table is None else table
    tree, state = _build(
        builder,
        ToyDrafter(builder.window, table.shape[1]),
        table,
        make_ctx(roots),
        jax.random.key(key),
        sampling,
    )
    return jax.tree.map(np.asarray, tree), jax.tree.map(np.asarray, state), np.asarray(table)


def check_tree(tree, builder, table, sampling, audit=None, strict=True):
    """Invariants every builder promises (see specdec.tree and specdec.builder): the public checker's
    (`specdec.trees.check_tree`), then what this harness's toy drafter lets us check exactly."""
    public_check_tree(tree, table.shape[1])
    b, n = tree.tokens.shape
    assert n == builder.num_nodes and tree.max_depth == builder.max_depth
    assert tree.valid[:, 0].all() and (tree.parents[:, 0] == -1).all() and (tree.depth[:, 0] == 0).all()
    assert (tree.tokens[~tree.valid] == PAD).all() and (tree.parents[~tree.valid] == -1).all()
    assert ((tree.tokens[tree.valid] >= 0) & (tree.tokens[tree.valid] < table.shape[1])).all()
    for r, i in zip(*np.nonzero(tree.valid[:, 1:]), strict=True):
        p = tree.parents[r, i + 1]
        assert 0 <= p <= i and tree.valid[r, p], "parents precede children and are valid"
        assert tree.depth[r, i + 1] == tree.depth[r, p] + 1 <= builder.max_depth
    kids = np.asarray(child_mask(tree))
    for r, i in zip(*np.nonzero(kids.any(-1)), strict=True):
        toks = tree.tokens[r][kids[r, i]]
        assert len(set(toks.tolist())) == len(toks), "siblings are distinct"
    # at every node with children, draft_probs is the processed draft distribution there
    q = np.asarray(probabilities(jnp.asarray(table[tree.depth, np.maximum(tree.tokens, 0)]), sampling))
    has_kids = kids.any(-1)
    np.testing.assert_allclose(tree.draft_probs[has_kids], q[has_kids], rtol=1e-5, atol=1e-7)
    # derived views agree: the path table ends at each node and follows parents
    anc, paths = np.asarray(ancestor_mask(tree)), np.asarray(root_paths(tree))
    depth = np.where(tree.valid, tree.depth, 0)
    np.testing.assert_array_equal(anc.sum(-1)[tree.valid], depth[tree.valid] + 1)
    for r, i in zip(*np.nonzero(tree.valid), strict=True):
        path = paths[r, i, : depth[r, i] + 1]
        assert path[-1] == i and path[0] == 0
        assert all(tree.parents[r, path[j]] == path[j - 1] for j in range(1, len(path)))
    if audit is not None:
        assert audit["out_of_window"] == 0 and audit["orphan"] == 0 and audit["repeated"] == 0
        if strict:
            assert audit["invalid"] == 0, "only valid nodes are expanded"


def token_paths(tree, r):
    """{root-to-node token path (root excluded)} of row r's valid nodes."""
    out = set()
    for i in np.nonzero(tree.valid[r])[0][1:]:
        path, j = [], i
        while j > 0:
            path.append(int(tree.tokens[r, j]))
            j = tree.parents[r, j]
        out.add(tuple(reversed(path)))
    return out


def assert_children_are_top_ranks(tree, table):
    """At T=0: each node's children, in index order, are its draft's rank-0, 1, ... tokens."""
    kids = np.asarray(child_mask(tree))
    for r, i in zip(*np.nonzero(tree.valid), strict=True):
        toks = tree.tokens[r][kids[r, i]]
        ranked = np.argsort(-table[tree.depth[r, i], tree.tokens[r, i]], kind="stable")
        np.testing.assert_array_equal(toks, ranked[: len(toks)])


ROOTS = [3, 7, 3]


# ---------------------------------------------------------------- static trees


def test_medusa63_and_eagle1_tensorize():
    t = StaticTree(MEDUSA_63)
    assert t.num_nodes == 64 and t.max_depth == 4 and t.window == 64
    assert np.bincount(t.depth).tolist() == [1, 10, 28, 23, 2]
    assert (np.isin(np.arange(64), t.parents, invert=True)).sum() == 42  # leaves
    for path, i in zip(t.choices, range(1, 64), strict=True):
        assert t.depth[i] == len(path) and t.rank[i] == path[-1]
        parent = t.choices[t.parents[i] - 1] if t.parents[i] else ()
        assert parent == path[:-1]
    assert (t.parents[1:] < np.arange(1, 64)).all()
    e = StaticTree(EAGLE1_25)
    assert e.num_nodes == 26 and e.max_depth == 5
    c = chain(4)
    assert c.num_nodes == 5 and list(c.parents) == [-1, 0, 1, 2, 3] and list(c.depth) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="lacks its parent"):
        StaticTree(((0,), (1, 0)))
    with pytest.raises(ValueError, match="contiguous"):
        StaticTree(((0,), (2,)), sample=True)


@pytest.mark.parametrize(
    "builder", [StaticTree(MEDUSA_63), StaticTree(EAGLE1_25), chain(5)], ids=lambda b: b.spec
)
def test_static_greedy_children_are_draft_top_k(builder):
    tree, audit, table = build(builder, ROOTS)
    check_tree(tree, builder, table, GREEDY, audit)
    assert tree.valid.all() and tree.sibling_mode == "deterministic"
    np.testing.assert_array_equal(tree.parents, np.broadcast_to(builder.parents, tree.parents.shape))
    assert_children_are_top_ranks(tree, table)
    lengths = np.asarray(make_ctx(ROOTS).lengths)
    np.testing.assert_array_equal(positions(tree, lengths), lengths[:, None] + builder.depth[None, :])
    np.testing.assert_array_equal(tree.tokens[0], tree.tokens[2])  # same root, same tree
    assert (tree.tokens[0] != tree.tokens[1]).any()
    assert audit["calls"] == builder.max_depth - 1  # begin + one expand per further depth


def test_static_sampled_truncation_marks_nodes_invalid():
    """top_k=2 sampling leaves 2 drawable children: rank >= 2 paths (and their subtrees) are PAD."""
    builder = StaticTree(EAGLE1_25, sample=True)
    s = SamplingConfig(temperature=1.0, top_k=2)
    tree, audit, table = build(builder, ROOTS, s)
    check_tree(tree, builder, table, s, audit, strict=False)  # static frontiers may hold invalid nodes
    want = np.array([True] + [max(p) < 2 for p in builder.choices])
    np.testing.assert_array_equal(tree.valid, np.broadcast_to(want, tree.valid.shape))
    assert tree.sibling_mode == "without_replacement"


# ---------------------------------------------------------------- recursive sampling


def _chi2(counts, expected):
    counts, expected = np.asarray(counts, float).ravel(), np.asarray(expected, float).ravel()
    assert counts[expected == 0].sum() == 0
    m = expected > 0
    return stats.chisquare(counts[m], expected[m] / expected[m].sum() * counts.sum()).pvalue


def test_rsd_siblings_are_sampled_without_replacement():
    builder, n, v = RSDTree((3, 2)), 20_000, 6
    table = make_table(4, v, scale=1.0)
    tree, audit, table = build(builder, [1] * n, HOT, table=table, key=5)
    check_tree(jax.tree.map(lambda x: x[:50], tree), builder, table, HOT, None)
    assert tree.valid.all() and tree.sibling_mode == "without_replacement"
    q0 = np.asarray(probabilities(jnp.asarray(table[0, 1]), HOT), np.float64)
    first, second = tree.tokens[:, 1], tree.tokens[:, 2]  # root's children in sampling order
    assert _chi2(np.bincount(first, minlength=v), q0) > 1e-3
    joint = np.zeros((v, v))
    np.add.at(joint, (first, second), 1)
    assert _chi2(joint, q0[:, None] * q0[None, :] / (1 - q0[:, None]) * (1 - np.eye(v))) > 1e-3
    # depth 2: the first child of node 1 is drawn from q at node 1 (conditioned on its token)
    q1 = np.asarray(probabilities(jnp.asarray(table[1]), HOT), np.float64)  # [parent token, V]
    kid = builder.static.parents.tolist().index(1)
    joint = np.zeros((v, v))
    np.add.at(joint, (first, tree.tokens[:, kid]), 1)
    assert _chi2(joint, q0[:, None] * q1) > 1e-3


def test_rsd_beam_samples_sequences_without_replacement():
    """Stochastic beam search: the top depth-2 path ~ q(path); the second ~ q without the first."""
    builder, n, v = RSDBeamTree(depth=2, beam=2), 30_000, 5
    table = make_table(6, v, scale=1.0)
    tree, audit, table = build(builder, [2] * n, HOT, table=table, key=7)
    check_tree(jax.tree.map(lambda x: x[:50], tree), builder, table, HOT, audit)
    assert tree.valid.all() and tree.sibling_mode == "without_replacement"
    q0 = np.asarray(probabilities(jnp.asarray(table[0, 2]), HOT), np.float64)
    q1 = np.asarray(probabilities(jnp.asarray(table[1]), HOT), np.float64)
    qs = (q0[:, None] * q1).ravel()  # sequence probabilities, index a*v + b
    seq = lambda i: tree.tokens[np.arange(n), tree.parents[:, i]] * v + tree.tokens[:, i]
    assert _chi2(np.bincount(tree.tokens[:, 1], minlength=v), q0) > 1e-3
    assert _chi2(np.bincount(seq(3), minlength=v * v), qs) > 1e-3
    second = (qs[:, None] * qs[None, :] / (1 - qs[:, None]) * (1 - np.eye(v * v))).sum(0)
    assert _chi2(np.bincount(seq(4), minlength=v * v), second) > 1e-3


@pytest.mark.parametrize("builder", [RSDTree((3, 2, 2)), RSDBeamTree(3, 3)], ids=lambda b: b.spec)
def test_recursive_greedy_is_deterministic_top_k(builder):
    tree, audit, table = build(builder, ROOTS, seed=8)
    check_tree(tree, builder, table, GREEDY, audit)
    assert tree.sibling_mode == "deterministic" and tree.valid.all()
    assert_children_are_top_ranks(tree, table)
    s = SamplingConfig(temperature=0.8, top_p=0.9)
    tree, audit, table = build(builder, ROOTS, s, seed=8)
    check_tree(tree, builder, table, s, audit, strict=False)


# ---------------------------------------------------------------- jit, parsing


def test_builders_jit_once_and_use_the_key():
    builder = RSDTree((2, 2))
    before = len(TRACES)
    a, _, _ = build(builder, ROOTS, HOT, seed=9, key=1)
    b, _, _ = build(builder, ROOTS, HOT, seed=9, key=2)
    assert len(TRACES) - before <= 1, "a new key must not retrace"
    assert (a.tokens != b.tokens).any()
    c, _, _ = build(builder, ROOTS, HOT, seed=9, key=1)
    np.testing.assert_array_equal(a.tokens, c.tokens)


SPECS = [
    ("chain:4", chain(4)),
    ("static:medusa63", StaticTree(MEDUSA_63)),
    ("static:eagle1,sample", StaticTree(EAGLE1_25, sample=True)),
    ("static:[(0,),(1,),(0,0)]", StaticTree(((0,), (1,), (0, 0)))),
    ("dynamic:depth=5,topk=8,n=32", DynamicTree(5, 8, 32)),
    ("dyspec:n=16", DySpecTree(16)),
    ("dyspec:n=16,topk=4,per_call=2", DySpecTree(16, topk=4, per_call=2)),
    ("rsd:2,2,1", RSDTree((2, 2, 1))),
    ("rsd-beam:depth=4,beam=3", RSDBeamTree(4, 3)),
]


@pytest.mark.parametrize(("spec", "want"), SPECS, ids=[s for s, _ in SPECS])
def test_parse_tree_round_trips(spec, want):
    got = parse_tree(spec)
    assert got == want and hash(got) == hash(want)
    assert parse_tree(got.spec) == got


@pytest.mark.parametrize(
    "spec",
    ["", "chain", "chain:x", "chain:0", "tree:3", "static:medusa", "static:[(0,),(1,0)]", "static:[1,2]",
     "dynamic:depth=5,foo=1", "dynamic:n=999", "dyspec:n=1", "rsd:2,0", "rsd-beam:depth=2,beam"],
)  # fmt: skip
def test_parse_tree_errors_list_valid_forms(spec):
    with pytest.raises(ValueError, match="valid tree specs") as e:
        parse_tree(spec)
    assert "rsd-beam:depth=4,beam=3" in str(e.value)

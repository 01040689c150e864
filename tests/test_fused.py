"""Drafter fusion (RASD): retrieval candidates merged into a model drafter's tree by longest prefix.

The merge (`fuse_paths`) against a host trie on random trees and candidates; no hits leave the
model tree as it is; an empty model tree gives the candidates' trie; the extra node budget cuts
candidates in rank order; pruning by the model's root distribution; compositions that cannot work
are refused; greedy = AR through the loop for token-level drafters (the trained families run fused
in test_drafters_trained.py, the sampled law at T = 1 with a negative control in
test_spec_stats.py).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from specdec.compose import CompositionError, make_spec
from specdec.drafters import NGram, layer_skip, parse_drafter
from specdec.drafters.fused import Fused
from specdec.generate import generate
from specdec.invariants import check_tree
from specdec.models import to_device
from specdec.sampling import SamplingConfig
from specdec.tree import PAD, Tree, compact
from specdec.trees import FusedTree, fit, parse_tree
from specdec.trees.fused import fuse_paths, prune_candidates
from specdec.verifiers import get_verifier

V = 6


def random_tree(rng, b: int, n: int, depth: int) -> Tree:
    """Random valid trees: node i > 0 hangs under a random earlier node above `depth`, distinct
    sibling tokens; a few slots left invalid."""
    tokens = np.full((b, n), PAD)
    parents = np.full((b, n), -1)
    dep = np.zeros((b, n), int)
    valid = np.zeros((b, n), bool)
    tokens[:, 0], valid[:, 0] = rng.integers(0, V, b), True
    for row in range(b):
        for i in range(1, n):
            if rng.random() < 0.2:
                continue
            options = [j for j in range(i) if valid[row, j] and dep[row, j] < depth]
            p = int(rng.choice(options))
            used = {tokens[row, c] for c in range(i) if valid[row, c] and parents[row, c] == p}
            free = [t for t in range(V) if t not in used]
            if not free:
                continue
            tokens[row, i], parents[row, i], dep[row, i], valid[row, i] = (
                rng.choice(free),
                p,
                dep[row, p] + 1,
                True,
            )
    a = lambda x, t=jnp.int32: jnp.asarray(x, t)  # noqa: E731
    return Tree(a(tokens), a(parents), a(dep), jnp.asarray(valid), max_depth=depth)


def paths_of(tree: Tree, row: int) -> list[tuple[int, ...]]:
    """Every valid node's root path (tokens after the root), in node order."""
    tok, par, val = (np.asarray(x)[row] for x in (tree.tokens, tree.parents, tree.valid))
    out = []
    for i in range(1, len(tok)):
        if val[i]:
            path, j = [], i
            while j > 0:
                path.append(int(tok[j]))
                j = int(par[j])
            out.append(tuple(reversed(path)))
    return out


def host_merge(model_paths, cands, extra: int):
    """The reference: insert candidates in rank order, longest prefix first, while slots last."""
    have, added = set(model_paths), []
    for cand in cands:
        for j in range(1, len(cand) + 1):
            if cand[:j] in have:
                continue
            if len(added) == extra:
                break
            have.add(cand[:j])
            added.append(cand[:j])
    return added


@pytest.mark.parametrize("extra_short", [False, True])
def test_merge_equals_a_host_trie(extra_short):
    rng = np.random.default_rng(1 if extra_short else 0)
    b, n, depth, r, length = 5, 9, 3, 3, 4
    for _ in range(12):
        tree = random_tree(rng, b, n, depth)
        toks = rng.integers(0, 3, (b, r, length))  # a small alphabet: shared prefixes everywhere
        cut = rng.integers(0, length + 1, (b, r))  # candidate r has cut[b, r] tokens
        ok = np.arange(length)[None, None, :] < cut[..., None]
        extra = 4 if extra_short else r * length
        fused, added = fuse_paths(tree, jnp.asarray(toks, jnp.int32), jnp.asarray(ok), extra, length)
        check_tree(fused, V)
        assert fused.num_nodes == n + extra
        for row in range(b):
            before = paths_of(tree, row)
            after = paths_of(fused, row)
            assert after[: len(before)] == before  # the model tree's nodes keep their slots
            cands = [tuple(int(t) for t in toks[row, i, : cut[row, i]]) for i in range(r)]
            want = host_merge(before, cands, extra)
            assert after[len(before) :] == want
            assert len(set(after)) == len(after)  # every node once: no duplicated prefix
            assert int(np.asarray(added)[row].sum()) == len(want)
        # compacted, the same nodes in the same order
        assert [paths_of(compact(fused), row) for row in range(b)] == [
            paths_of(fused, row) for row in range(b)
        ]


def test_no_hits_leave_the_model_tree_and_an_empty_tree_gives_the_trie():
    rng = np.random.default_rng(2)
    tree = random_tree(rng, 3, 7, 2)
    toks = jnp.asarray(rng.integers(0, V, (3, 2, 4)), jnp.int32)
    fused, added = fuse_paths(tree, toks, jnp.zeros((3, 2, 4), bool), 8, 4)
    assert not bool(added.any())
    for f in ("tokens", "parents", "depth", "valid"):
        assert (np.asarray(getattr(fused, f))[:, :7] == np.asarray(getattr(tree, f))).all()
    root_only = Tree.empty(tree.tokens[:, 0], 1, 0)
    trie, _ = fuse_paths(root_only, toks, jnp.ones((3, 2, 4), bool), 8, 4)
    for row in range(3):
        cands = [tuple(int(t) for t in np.asarray(toks)[row, i]) for i in range(2)]
        assert paths_of(trie, row) == host_merge([], cands, 8)


def test_pruning_keeps_top_k_or_likely_first_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05, 0.0, 0.0]]) + 1e-12)
    toks = jnp.asarray([[[0, 1], [2, 0], [3, 3]]], jnp.int32)
    ok = jnp.ones((1, 3, 2), bool)
    kept = lambda **kw: np.asarray(prune_candidates(logits, toks, ok, SamplingConfig(), **kw))[0, :, 0]  # noqa: E731
    assert kept(topk=2, theta=0.1).tolist() == [True, True, False]  # 0.15 >= theta
    assert kept(topk=1, theta=0.2).tolist() == [True, False, False]
    assert kept(topk=1, theta=0.0).tolist() == [True, True, True]  # theta 0: no pruning


def test_parse_and_refusals(tiny_targets):
    loaded = tiny_targets["llama"]
    cfg = loaded.cfg
    params = to_device(loaded.params, cfg)
    d, dp = parse_drafter("layerskip:1+ngram:n=2,paths=3,len=5", params, cfg, max_depth=2)
    assert isinstance(d, Fused) and d.fused == (3, 5) and dp[1] == (None,)
    builder = fit(parse_tree("chain:2"), d)
    assert builder == parse_tree(builder.spec) == FusedTree(parse_tree("chain:2"), 3, 5)
    assert (builder.num_nodes, builder.max_depth, builder.model_depth) == (3 + 15, 5, 2)
    budget = fit(parse_tree("chain:2+budget:4"), d)
    assert budget.spec == "chain:2+fused:paths=3,len=5+budget:4" and parse_tree(budget.spec) == budget
    s = SamplingConfig()
    make_spec(cfg, s, d, builder)
    with pytest.raises(CompositionError, match="fuses None"):
        make_spec(cfg, s, d, parse_tree("chain:2"))  # retrieval candidates nobody merges
    with pytest.raises(CompositionError, match="fuses"):
        make_spec(cfg, s, d.model, builder)  # a fused tree without retrieval sources
    with pytest.raises(CompositionError, match="siblings"):
        make_spec(cfg, SamplingConfig(1.0), d, builder, get_verifier("specinfer"))
    with pytest.raises(ValueError, match="not a retrieval source"):
        parse_drafter("layerskip:1+layerskip:1", params, cfg, max_depth=2)
    with pytest.raises(ValueError, match="unknown option"):
        parse_drafter("layerskip:1+ngram:k=2", params, cfg, max_depth=2)


@pytest.mark.parametrize("model", ["layerskip", "ngram"])
def test_greedy_fused_equals_ar(tiny_targets, model):
    """Token-level model drafters fused with prompt lookup: greedy = AR, invariants checked every
    step, and retrieval nodes were accepted (the repetitive prompts give hits)."""
    loaded = tiny_targets["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    params = to_device(loaded.params, cfg)
    prompts = [[5, 9, 3, 5, 9, 3, 5, 9], [12, 13, 14, 12, 13], list(range(20, 45))]
    ar = generate(params, cfg, prompts, max_new_tokens=20).tokens
    if model == "layerskip":
        m, mp = layer_skip(params, cfg, 1)
        inner = parse_tree("dynamic:depth=2,topk=2,n=4")
    else:
        m, mp = NGram(cfg.vocab_size, max_depth=2), None
        inner = parse_tree("chain:2")
    d = Fused(m, (NGram(cfg.vocab_size, max_depth=4, paths=2),))
    builder = fit(inner, d)
    out = generate(params, cfg, prompts, max_new_tokens=20, drafter=d, draft_params=(mp, (None,)),
                   builder=builder, check=True)  # fmt: skip
    assert out.tokens == ar
    assert sum(out.accepted_hist[inner.max_depth + 2 :]) > 0  # paths deeper than the model's accepted


def test_fused_tree_is_deterministic_at_every_temperature():
    b = FusedTree(parse_tree("chain:2,sample"), 2, 3)
    assert b.sibling_mode(SamplingConfig(1.0)) == "deterministic"
    assert b.widths == (3, 6, 9)
    assert (
        dataclasses.replace(b, theta=0.1, topk=2).spec
        == "chain:2,sample+fused:paths=2,len=3,topk=2,theta=0.1"
    )

"""The batch draft budget: which nodes it keeps, and the flattened ragged forward it drives.

End-to-end losslessness (greedy = AR, the sampled two-token law) is in tests/test_spec.py with the
other builders (`TREE+budget:M` entries)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import KVCache, causal_mask
from specdec.models import forward, to_device
from specdec.tree import PAD, Tree, ancestor_mask, positions
from specdec.trees import parse_tree
from specdec.trees.budget import lag_priority, prune

# Row 0 a confident chain, row 1 a less confident tree (nodes 1, 2 children of the root, 3 of 1),
# row 2 the root alone. Scores are cumulative log q; a child never outscores its parent.
TOKENS = [[5, 6, 7, 8], [9, 10, 11, 12], [13, PAD, PAD, PAD]]
PARENTS = [[-1, 0, 1, 2], [-1, 0, 0, 1], [-1, -1, -1, -1]]
DEPTH = [[0, 1, 2, 3], [0, 1, 1, 2], [0, 0, 0, 0]]
VALID = [[True] * 4, [True] * 4, [True, False, False, False]]
SCORE = [[0.0, -0.1, -0.5, -2.0], [0.0, -0.3, -1.0, -0.6], [0.0, -np.inf, -np.inf, -np.inf]]


def _tree(mode="deterministic", score=True):
    probs = jnp.zeros((3, 4, 16)).at[:, 0, 0].set(jnp.array([0.9, 0.2, 0.5]))
    return Tree(
        tokens=jnp.array(TOKENS), parents=jnp.array(PARENTS), depth=jnp.array(DEPTH), valid=jnp.array(VALID),
        draft_probs=probs, max_depth=3, sibling_mode=mode, score=jnp.array(SCORE) if score else None,
    )  # fmt: skip


def test_prune_keeps_the_most_confident_drafts_of_the_batch():
    t = prune(_tree(), 3)  # best three drafted nodes: (0,1) -0.1, (1,1) -0.3, (0,2) -0.5
    want = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    np.testing.assert_array_equal(t.valid, np.array(want, bool))
    assert (np.asarray(t.tokens)[~np.asarray(t.valid)] == PAD).all()
    assert (np.asarray(t.parents)[~np.asarray(t.valid)] == -1).all()
    t = prune(_tree(), 4)  # next: (1,3) -0.6, a grandchild whose parent is kept
    np.testing.assert_array_equal(t.valid[1], [1, 1, 0, 1])


def test_prune_is_ancestor_closed_and_never_over_budget():
    rng = np.random.default_rng(0)
    for _ in range(20):
        score = jnp.array(rng.normal(size=(3, 4)), jnp.float32)  # not monotone: closure must be enforced
        t = prune(_tree().replace(score=score.at[:, 0].set(0.0)), 2)
        v, par = np.asarray(t.valid), np.asarray(_tree().parents)
        assert v[:, 0].all() and v.sum() <= 3 + 2
        for b, n in zip(*np.nonzero(v[:, 1:]), strict=True):
            assert v[b, par[b, n + 1]]


def test_prune_without_scores_goes_breadth_first():
    t = prune(_tree(score=False), 3)  # depth 1 first: (0,1), (1,1), (1,2)
    np.testing.assert_array_equal(t.valid, np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], bool))


def test_prune_sampled_siblings_keeps_whole_rows_by_root_confidence():
    t = prune(_tree("without_replacement"), 3)  # row 0 (0.9, 3 drafts) fits; row 1 (3 more) does not
    np.testing.assert_array_equal(t.valid, np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]], bool))
    t = prune(_tree("iid"), 6)
    np.testing.assert_array_equal(t.valid, np.array(VALID))


def test_lagging_rows_come_first_and_finished_rows_draft_nothing():
    prio = lag_priority(jnp.array([10, 8, 3]), 64, jnp.array([False, False, True]))
    np.testing.assert_array_equal(prio, [-2.0, 0.0, -np.inf])  # row 1 is 2 tokens behind row 0
    t = prune(_tree(), 3, prio)  # row 1's three drafts (-0.3, -0.6, -1.0) beat row 0's (-2.1, ...)
    np.testing.assert_array_equal(t.valid, np.array([[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool))
    t = prune(_tree(), 5, prio)  # the leftover budget still goes to row 0 (the block is computed anyway)
    np.testing.assert_array_equal(t.valid[0], [1, 1, 1, 0])
    t = prune(_tree("iid"), 6, jnp.array([0.0, 0.0, -jnp.inf]))
    np.testing.assert_array_equal(t.valid, np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]], bool))
    t = prune(_tree("iid"), 6, jnp.array([-1.0, 0.0, 0.0]))  # priority before confidence
    np.testing.assert_array_equal(t.valid[1], [1, 1, 1, 1])


def test_budget_spec_round_trips_and_rejects_bad_forms():
    b = parse_tree("static:[(0,),(1,),(0,0)]+budget:5")
    assert parse_tree(b.spec) == b and b.budget == 5 and b.num_nodes == 4
    for bad in ("chain:3+budget:0", "chain:3+foo:2", "chain:3+budget:2+budget:3"):
        with pytest.raises(ValueError, match="bad tree spec"):
            parse_tree(bad)


def test_compact_forward_equals_the_full_block_on_the_computed_tokens(tiny_targets):
    loaded = tiny_targets["llama"]
    cfg = loaded.cfg
    params = to_device(loaded.params, cfg)
    b, t = 3, 6
    prompt = jnp.array(np.random.default_rng(1).integers(3, 90, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    _, _, cache = forward(params, cfg, prompt, pos, KVCache.init(cfg, b, 32), causal_mask(b, t))
    cache = cache.advance(jnp.array([6, 4, 5]))
    tree = prune(_tree().replace(tokens=jnp.where(jnp.array(VALID), jnp.array(TOKENS) + 20, PAD)), 3)
    toks = jnp.where(tree.valid, tree.tokens, 0)
    args = (params, cfg, toks, positions(tree, cache.lengths), cache, ancestor_mask(tree))
    full_logits, full_taps, full_cache = forward(*args, taps=(1,))
    (compact,) = jnp.nonzero(tree.valid.reshape(-1), size=b + 3 + 2, fill_value=0)  # 2 padding entries
    logits, taps, c = forward(*args, taps=(1,), compact=compact)
    v = np.asarray(tree.valid)
    np.testing.assert_allclose(np.asarray(logits)[v], np.asarray(full_logits)[v], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(taps[0])[v], np.asarray(full_taps[0])[v], rtol=1e-5, atol=1e-5)
    assert not np.asarray(logits)[~v].any()  # uncomputed tokens: zeros
    rows, nodes = np.nonzero(v)
    slots = np.asarray(cache.lengths)[rows] + nodes
    np.testing.assert_allclose(np.asarray(c.k)[:, rows, slots], np.asarray(full_cache.k)[:, rows, slots],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    jax.clear_caches()


def test_ngram_min_match_option(tiny_targets):
    from specdec.drafters import parse_drafter

    loaded = tiny_targets["llama"]
    d, _ = parse_drafter("ngram:n=3,min=2", None, loaded.cfg, max_depth=4)
    assert (d.min_n, d.max_n, d.max_depth) == (2, 3, 4)
    for bad in ("ngram:n=2,min=3", "ngram:min=0", "ngram:mn=2"):
        with pytest.raises(ValueError, match="ngram:n=3"):
            parse_drafter(bad, None, loaded.cfg, max_depth=4)

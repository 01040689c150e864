"""Verifier unit tests: hand-built trees, temperature-0 reduction to greedy, typical acceptance's own
definition, analytic acceptance rates, numerics, the registry and the docs example.

The distributional (chi-square) tests are in test_verifiers_stats.py, the negative controls in
test_verifiers_controls.py (harness: verifier_toy.py).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.sampling import SamplingConfig, probabilities
from specdec.tree import PAD, Tree
from specdec.verifiers import (
    LOSSLESS,
    SIBLING_MODES,
    VERIFIERS,
    TypicalAcceptance,
    Verdict,
    get_verifier,
    greedy_verify,
    rrs_verify,
    speculative_verify,
    target_only_verify,
)

GREEDY = SamplingConfig()
LOSSLESS_NAMES = [n for n in VERIFIERS if LOSSLESS[n]]


@functools.cache
def jitted(name_or_fn):
    fn = get_verifier(name_or_fn) if isinstance(name_or_fn, str) else name_or_fn
    return jax.jit(fn, static_argnums=3)


def make_tree(tokens, parents, valid=None, q=None, mode="deterministic") -> Tree:
    parents = np.asarray(parents)
    depth = np.zeros(parents.shape, np.int32)
    for i in range(1, parents.shape[1]):
        depth[:, i] = np.where(parents[:, i] >= 0, depth[np.arange(len(depth)), parents[:, i]] + 1, 0)
    valid = jnp.ones(np.shape(tokens), bool) if valid is None else jnp.asarray(valid, bool)
    tokens, parents = jnp.asarray(tokens, jnp.int32), jnp.asarray(parents, jnp.int32)
    return Tree(tokens, parents, jnp.asarray(depth), valid, q, int(depth.max()), mode)


def check_invariants(tree: Tree, v: Verdict, vocab: int):
    """path starts at the root, follows parents through valid real tokens, zeros past n_accepted."""
    path, n = np.asarray(v.path), np.asarray(v.n_accepted)
    tokens, parents, valid = (np.asarray(a) for a in (tree.tokens, tree.parents, tree.valid))
    assert (path[:, 0] == 0).all()
    for b in range(len(n)):
        for d in range(1, path.shape[1]):
            node = path[b, d]
            if d <= n[b]:
                assert valid[b, node] and tokens[b, node] >= 0 and parents[b, node] == path[b, d - 1]
            else:
                assert node == 0
    nxt = np.asarray(v.next_token)
    assert ((nxt >= 0) & (nxt < vocab)).all()


# ------------------------------------------------------------------------------------ hand-built trees
# Root 0 -> children 1 (token 3), 2 (token 5); node 1 -> 3 (token 2), 4 (token 6); node 2 -> 5 (token 1);
# node 3 -> 6 (token 4); node 4 -> 7 (token PAD or 7).
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 4]
V = 8


def hand_logits(row_argmax):
    """Target logits whose argmax after node i is row_argmax[i]."""
    return jnp.asarray([np.eye(V)[a] * 5.0 for a in row_argmax], jnp.float32)


HAND = [  # (tokens, valid, target argmax after each node, expected path, expected next token)
    ([9, 3, 5, 2, 6, 1, 4, 7], [1] * 8, [3, 2, 0, 4, 7, 0, 7, 0], [0, 1, 3, 6], 7),  # all the way down
    ([9, 3, 5, 2, 6, 1, 4, 7], [1] * 6 + [0, 1], [3, 2, 0, 4, 7, 0, 7, 0], [0, 1, 3, 0], 4),  # node 6 invalid
    ([9, 3, 5, 2, 6, 1, 4, PAD], [1] * 8, [3, 6, 0, 0, 7, 0, 0, 0], [0, 1, 4, 0], 7),  # PAD (wraps to 7)
    ([9, 3, 5, 2, 6, 1, 4, 7], [1] * 7 + [0], [3, 6, 0, 0, 7, 0, 0, 0], [0, 1, 4, 0], 7),  # matching, invalid
    ([9, 3, 5, 2, 6, 1, 4, 7], [1] * 8, [1, 6, 0, 0, 7, 0, 0, 0], [0, 0, 0, 0], 1),  # no child matches
    ([9, 3, 5, 2, 6, 1, 4, 7], [1, 1, 1, 1, 1, 0, 1, 1], [5, 0, 1, 0, 0, 2, 0, 0], [0, 2, 0, 0], 1),
]


def test_hand_built_tree_temperature_zero():
    """Rows accepting 3, 2, 2, 2, 0, 1 tokens; invalid or PAD nodes are never accepted, even matching."""
    b = len(HAND)
    tree = make_tree([h[0] for h in HAND], [PARENTS] * b, valid=[h[1] for h in HAND])
    iid = tree.replace(sibling_mode="iid", draft_probs=jnp.full((b, 8, V), 1.0 / V))
    logits = jnp.stack([hand_logits(h[2]) for h in HAND])
    want_path = np.array([h[3] for h in HAND])
    for name in VERIFIERS:
        if name == "speculative":
            continue  # chains only: see test_chains_temperature_zero
        t = iid if name in ("specinfer", "spectr") else tree
        v = jitted(name)(t, logits, jax.random.key(0), GREEDY)
        np.testing.assert_array_equal(v.path, want_path, err_msg=name)
        np.testing.assert_array_equal(v.n_accepted, (want_path > 0).sum(1), err_msg=name)
        np.testing.assert_array_equal(v.next_token, [h[4] for h in HAND], err_msg=name)


def test_chains_temperature_zero():
    """All lossless verifiers on chains: two hand rows (3 and 1 accepted), then random rows = greedy."""
    vocab, b = 4, 256
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 2, (b, 4)).astype(np.int32)
    tokens[:2] = [[0, 1, 2, 3], [0, 1, 3, 3]]
    logits = np.asarray(rng.integers(0, 2, (b, 4, vocab)), np.float32)  # ties: first max wins
    logits[:2] = np.eye(vocab)[[[1, 2, 3, 0], [1, 2, 3, 0]]]
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, 4, vocab)), jnp.float32))
    chain = Tree.chain(jnp.asarray(tokens), draft_probs=q, sibling_mode="iid")
    ref = jitted("greedy")(chain, jnp.asarray(logits), jax.random.key(0), GREEDY)
    np.testing.assert_array_equal(ref.n_accepted[:2], [3, 1])
    np.testing.assert_array_equal(ref.next_token[:2], [0, 2])
    np.testing.assert_array_equal(ref.path[:2], [[0, 1, 2, 3], [0, 1, 0, 0]])
    assert len(set(np.asarray(ref.n_accepted).tolist())) == 4
    for name in LOSSLESS_NAMES:
        v = jitted(name)(chain, jnp.asarray(logits), jax.random.key(2), GREEDY)
        for field in ("path", "n_accepted", "next_token"):
            np.testing.assert_array_equal(getattr(v, field), getattr(ref, field), err_msg=f"{name} {field}")


# ------------------------------------------------------------------------------- random trees, T = 0
def random_tree(seed: int, b: int, shape, vocab: int, mode: str, dup_vocab: int | None = None):
    """A complete tree (breadth first) with random tokens (distinct per node unless iid), random
    invalid subtrees, random q; tokens drawn from a small range in iid mode so repeats happen."""
    rng = np.random.default_rng(seed)
    parents, prev = [-1], [0]
    for k in shape:
        cur = list(range(len(parents), len(parents) + len(prev) * k))
        parents += [p for p in prev for _ in range(k)]
        prev = cur
    n = len(parents)
    tokens = np.zeros((b, n), np.int32)
    for i in range(1, n):
        if mode == "iid":
            tokens[:, i] = rng.integers(0, dup_vocab or vocab, b)
    for p in range(n):  # distinct children per parent for the other modes
        kids = [i for i in range(n) if parents[i] == p]
        if kids and mode != "iid":
            tokens[:, kids] = np.argsort(rng.random((b, vocab)), axis=1)[:, : len(kids)]
    valid = np.ones((b, n), bool)
    for i in range(1, n):
        valid[:, i] = valid[:, parents[i]] & (rng.random(b) > 0.1)
    tokens = np.where(valid, tokens, PAD)
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, n, vocab)) * 2, jnp.float32))
    return make_tree(tokens, np.broadcast_to(parents, (b, n)), valid, q, mode)


def test_temperature_zero_reduces_to_greedy():
    """Every lossless tree verifier returns greedy's exact Verdict at T = 0 on i.i.d. trees (the
    hardest case: repeated tokens; every tree verifier supports it) with integer logits (ties)."""
    vocab, b = 4, 256
    tree = random_tree(0, b, (3, 2, 2), vocab, "iid", dup_vocab=2)
    logits = jnp.asarray(np.random.default_rng(1).integers(0, 3, (b, tree.num_nodes, vocab)), jnp.float32)
    ref = jitted("greedy")(tree, logits, jax.random.key(0), GREEDY)
    check_invariants(tree, ref, vocab)
    assert len(set(np.asarray(ref.n_accepted).tolist())) == 4  # every depth is exercised
    np.testing.assert_array_equal(ref.next_token, jnp.argmax(logits[jnp.arange(b), ref.path.max(1)], -1))
    for name in LOSSLESS_NAMES:
        if name == "speculative":
            continue
        v = jitted(name)(tree, logits, jax.random.key(2), GREEDY)
        for field in ("path", "n_accepted", "next_token"):
            np.testing.assert_array_equal(getattr(v, field), getattr(ref, field), err_msg=f"{name} {field}")


# ------------------------------------------------------------------------------- consistency, numerics
def test_speculative_equals_rrs_on_chains():
    """Same key plumbing and the same maths on a chain: identical Verdicts at T > 0 (and `auto` is
    block verification on a chain of sampled drafts at T > 0, `rrs` on a tree)."""
    vocab, b = 6, 512
    rng = np.random.default_rng(4)
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, 4, vocab)), jnp.float32))
    tokens = jax.random.categorical(jax.random.key(5), jnp.log(q)).at[:, 0].set(0)
    chain = Tree.chain(tokens.astype(jnp.int32), draft_probs=q, sibling_mode="without_replacement")
    logits = jnp.asarray(rng.normal(size=(b, 4, vocab)), jnp.float32)
    s = SamplingConfig(0.9, top_k=4)
    a = jitted(speculative_verify)(chain, logits, jax.random.key(6), s)
    r = jitted(rrs_verify)(chain, logits, jax.random.key(6), s)
    auto = jitted("auto")(chain, logits, jax.random.key(6), s)
    block = jitted("block")(chain, logits, jax.random.key(6), s)
    for field in ("path", "n_accepted", "next_token"):
        np.testing.assert_array_equal(getattr(a, field), getattr(r, field))
        np.testing.assert_array_equal(getattr(auto, field), getattr(block, field))
    assert 0 < float(a.n_accepted.mean()) < 3


def test_rrs_deterministic_is_target_only():
    tree = random_tree(6, 64, (3, 2), 6, "deterministic")
    logits = jnp.asarray(np.random.default_rng(7).normal(size=(64, tree.num_nodes, 6)), jnp.float32)
    a = jitted(rrs_verify)(tree, logits, jax.random.key(8), SamplingConfig(1.0))
    b = jitted(target_only_verify)(tree, logits, jax.random.key(8), SamplingConfig(1.0))
    np.testing.assert_array_equal(a.path, b.path)
    np.testing.assert_array_equal(a.next_token, b.next_token)


@pytest.mark.parametrize("case", ["p_equals_q", "disjoint", "one_hot_q", "q_zero_on_draft"])
def test_degenerate_distributions_give_valid_tokens(case):
    """No NaN: residuals with no mass fall back to p; emitted tokens stay in p's support."""
    vocab, b = 5, 2048
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.2, 0.0, 0.0]))
    q = {
        "p_equals_q": jnp.asarray([0.5, 0.3, 0.2, 0.0, 0.0]),
        "disjoint": jnp.asarray([0.0, 0.0, 0.0, 0.6, 0.4]),
        "one_hot_q": jnp.asarray([0.0, 1.0, 0.0, 0.0, 0.0]),
        "q_zero_on_draft": jnp.asarray([1.0, 0.0, 0.0, 0.0, 0.0]),
    }[case]
    tok = {"p_equals_q": [1, 0], "disjoint": [3, 4], "one_hot_q": [1, 1], "q_zero_on_draft": [2, 0]}[case]
    tokens = jnp.asarray([[9 % vocab, *tok]] * b)
    tree = make_tree(tokens, [[-1, 0, 0]] * b, q=jnp.broadcast_to(q, (b, 3, vocab)), mode="iid")
    lg = jnp.broadcast_to(logits, (b, 3, vocab))
    for name in ["rrs", "specinfer", "spectr", "target_only"]:
        v = jitted(name)(tree, lg, jax.random.key(0), SamplingConfig(1.0))
        nxt = np.asarray(v.next_token)
        assert (nxt < 3).all(), name  # never a token with target probability 0
        accepted = np.asarray(v.n_accepted) == 1
        assert np.isin(np.asarray(tokens)[accepted, np.asarray(v.path)[accepted, 1]], [0, 1, 2]).all()


# --------------------------------------------------------------------------- analytic acceptance rates
def draft_rows(q: np.ndarray, b: int, k: int, seed: int, replace: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if replace:
        return rng.choice(len(q), size=(b, k), p=q)
    keys = np.log(q) + rng.gumbel(size=(b, len(q)))
    return np.argsort(-keys, axis=1)[:, :k]


P5 = np.array([0.35, 0.25, 0.2, 0.15, 0.05])
Q5 = np.array([0.1, 0.45, 0.05, 0.3, 0.1])


def single_node(name: str, k: int, mode: str, b: int = 100_000):
    kids = draft_rows(Q5, b, k, seed=k, replace=mode == "iid")
    tokens = np.concatenate([np.zeros((b, 1), int), kids], axis=1)
    tree = make_tree(
        tokens, [[-1] + [0] * k] * b, q=jnp.broadcast_to(jnp.asarray(Q5, jnp.float32), (b, k + 1, 5))
    )
    tree = dataclasses.replace(tree, sibling_mode=mode)
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(P5, jnp.float32)), (b, k + 1, 5))
    v = jitted(name)(tree, logits, jax.random.key(k), SamplingConfig(1.0))
    return float(np.mean(np.asarray(v.n_accepted)))


def test_speculative_acceptance_is_one_minus_tv():
    rate = single_node("speculative", 1, "iid")
    expected = np.minimum(P5, Q5).sum()
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / 100_000)


def test_spectr_acceptance_matches_kseq_formula():
    k = 3
    beta = lambda rho: np.minimum(Q5, P5 / rho).sum()
    rhos = np.linspace(1, k, 200_001)
    rho = rhos[np.argmax([1 - (1 - beta(r)) ** k <= r * beta(r) for r in rhos])]
    expected = 1 - (1 - beta(rho)) ** k
    rate = single_node("spectr", k, "iid")
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / 100_000) + 1e-4
    assert rate > single_node("specinfer", k, "iid")  # K-SEQ beats MSS on this pair


def test_rrs_acceptance_matches_recursion():
    """Two children drawn without replacement: exact acceptance by enumerating the ordered pair."""
    expected = 0.0
    for x1 in range(5):
        a1 = min(1.0, P5[x1] / Q5[x1])
        p2 = np.maximum(P5 - Q5, 0)
        p2 /= p2.sum()
        q2 = Q5.copy()
        q2[x1] = 0
        q2 /= q2.sum()
        a2 = sum(q2[x2] * min(1.0, p2[x2] / q2[x2]) for x2 in range(5) if q2[x2] > 0)
        expected += Q5[x1] * (a1 + (1 - a1) * a2)
    rate = single_node("rrs", 2, "without_replacement")
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / 100_000)


# ------------------------------------------------------------------------------------------ typical
def test_typical_acceptance_follows_its_definition():
    vocab, b = 6, 128
    tree = random_tree(9, b, (3, 2), vocab, "without_replacement")
    rng = np.random.default_rng(10)
    logits = jnp.asarray(rng.normal(size=(b, tree.num_nodes, vocab)) * 2, jnp.float32)
    s, ver = SamplingConfig(0.8), TypicalAcceptance(posterior_threshold=0.2)
    v = jax.jit(lambda t, lg, verifier: verifier(t, lg, None, s), static_argnums=2)(tree, logits, ver)
    p = np.asarray(probabilities(logits, s), np.float64)
    tokens, parents, valid, depth = (
        np.asarray(a) for a in (tree.tokens, tree.parents, tree.valid, tree.depth)
    )
    for r in range(b):
        ent = -(p[r] * np.log(p[r] + 1e-5)).sum(-1)
        thr = np.minimum(0.2, np.sqrt(0.2) * np.exp(-ent))
        best, best_key = 0, (0, 0.0)
        for i in range(1, tree.num_nodes):
            node, ok, logp = i, True, 0.0
            while node > 0:  # walk up: every node on the root path must pass
                par = parents[r, node]
                ok &= bool(valid[r, node]) and p[r, par, tokens[r, node]] > thr[par]
                logp += np.log(p[r, par, max(tokens[r, node], 0)])
                node = par
            if ok and (depth[r, i], logp) > best_key:
                best, best_key = i, (depth[r, i], logp)
        assert int(v.n_accepted[r]) == depth[r, best], r
        assert int(v.path[r, depth[r, best]]) == best, r
        assert int(v.next_token[r]) == int(np.argmax(np.asarray(logits[r, best])))
    assert len(set(np.asarray(v.n_accepted).tolist())) > 1  # several outcomes exercised


def test_typical_is_labelled_lossy_and_configurable():
    """The registry's labels (the chi-square evidence that typical is lossy is in
    test_verifiers_controls.py) and the configuration."""
    from specdec.verifiers import typical

    assert typical.LOSSLESS is False and TypicalAcceptance.LOSSLESS is False and LOSSLESS["typical"] is False
    assert all(LOSSLESS[n] for n in VERIFIERS if n != "typical")
    assert TypicalAcceptance().alpha == pytest.approx(0.3)
    assert TypicalAcceptance(0.09, posterior_alpha=0.5).alpha == 0.5
    assert hash(TypicalAcceptance(0.05)) == hash(TypicalAcceptance(0.05))
    with pytest.raises(ValueError):
        TypicalAcceptance(posterior_threshold=0.0)


def test_typical_uses_no_randomness_and_is_greedy_at_temperature_zero():
    """What typical's docstring claims, as behaviour: a deterministic threshold (the same Verdict
    under any key, at T > 0) and, at T = 0, where P is one-hot, exactly greedy's Verdict (trees
    with distinct siblings and tied integer logits; random i.i.d. trees give equal-token siblings
    different logits, which no model does, and there greedy's joint descent may differ)."""
    vocab, b = 6, 128
    tree = random_tree(13, b, (3, 2), vocab, "without_replacement")
    logits = jnp.asarray(np.random.default_rng(14).normal(size=(b, tree.num_nodes, vocab)) * 2, jnp.float32)
    typical = jitted(TypicalAcceptance(posterior_threshold=0.2))
    one, other = (typical(tree, logits, jax.random.key(k), SamplingConfig(0.9)) for k in (0, 1))
    for field in ("path", "n_accepted", "next_token"):
        np.testing.assert_array_equal(getattr(one, field), getattr(other, field), err_msg=field)
    assert len(set(np.asarray(one.n_accepted).tolist())) > 1  # not a constant verdict

    vocab = 4
    tree = random_tree(15, 256, (3, 2, 2), vocab, "deterministic")
    logits = jnp.asarray(np.random.default_rng(16).integers(0, 3, (256, tree.num_nodes, vocab)), jnp.float32)
    ref = jitted("greedy")(tree, logits, jax.random.key(0), GREEDY)
    assert len(set(np.asarray(ref.n_accepted).tolist())) == 4  # every depth is exercised
    v = jitted("typical")(tree, logits, jax.random.key(2), GREEDY)
    for field in ("path", "n_accepted", "next_token"):
        np.testing.assert_array_equal(getattr(v, field), getattr(ref, field), err_msg=f"typical {field}")


# --------------------------------------------------------------------------------- registry and docs
def test_registry():
    names = {"auto", "block", "greedy", "speculative", "rrs", "specinfer", "target_only", "typical", "spectr"}
    assert set(VERIFIERS) == names and set(LOSSLESS) == names and set(SIBLING_MODES) == names
    assert get_verifier("rrs") is rrs_verify and get_verifier("greedy") is greedy_verify
    with pytest.raises(ValueError, match="valid names: auto, block, greedy, rrs, specinfer, spectr, specul"):
        get_verifier("nope")
    tree = random_tree(0, 2, (2,), 4, "without_replacement")
    with pytest.raises(ValueError, match="sibling_mode"):
        get_verifier("specinfer")(tree, jnp.zeros((2, 3, 4)), jax.random.key(0), GREEDY)
    with pytest.raises(ValueError, match="draft_probs"):
        rrs_verify(tree.replace(draft_probs=None), jnp.zeros((2, 3, 4)), jax.random.key(0), GREEDY)


def docs_example() -> dict:
    text = (pathlib.Path(__file__).parents[1] / "docs" / "verifiers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1 and len(blocks[0].splitlines()) < 40
    namespace: dict = {}
    exec(compile(blocks[0], "docs/verifiers.md", "exec"), namespace)
    return namespace


def test_docs_example_verifier_runs():
    ns = docs_example()
    vocab, b = 4, 256
    tree = random_tree(11, b, (2, 2, 2), vocab, "deterministic")
    logits = jnp.asarray(np.random.default_rng(12).integers(0, 3, (b, tree.num_nodes, vocab)), jnp.float32)
    ref = jitted("greedy")(tree, logits, jax.random.key(0), GREEDY)
    v = jax.jit(ns["two_deep"], static_argnums=3)(tree, logits, jax.random.key(0), GREEDY)
    check_invariants(tree, v, vocab)
    short = np.asarray(ref.n_accepted) <= 2  # where greedy stops early the example agrees with it
    np.testing.assert_array_equal(np.asarray(v.path)[short], np.asarray(ref.path)[short])
    np.testing.assert_array_equal(np.asarray(v.next_token)[short], np.asarray(ref.next_token)[short])
    np.testing.assert_array_equal(np.asarray(v.n_accepted)[~short], 2)  # and is capped otherwise
    assert (~short).any() and short.any()

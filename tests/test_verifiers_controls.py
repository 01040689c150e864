"""Negative controls of the verifier chi-square harness (tests/verifier_toy.py): each injects one
pitfall of reference section F into a correct pipeline and must reach p < 1e-8, so a harness that
cannot fail would fail here; typical acceptance (labelled lossy) must fail too.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from specdec.verifiers import block, rrs, spectr, walk
from specdec.verifiers import get_verifier as get
from tests.verifier_toy import FAIL_P, IID, T07K, T1, T13P, WOR, Drafting, bfs_layout, check


def parents_of(shape):
    return jnp.asarray(bfs_layout(shape)[0])


def sibling_rank(shape):
    parents = bfs_layout(shape)[0]
    return jnp.asarray([sum(parents[:j] == parents[j]) for j in range(len(parents))])


_UNIFORMS = walk.uniforms


def broken_uniforms(key, batch, n, slot_of):
    """Like walk.uniforms, but node j gets the coin of slot slot_of[j] (so some coins are shared)."""
    coins, emit_u = _UNIFORMS(key, batch, n)
    return coins[:, slot_of], emit_u


def rrs_no_skip(tree, target_logits, key, sampling):
    """RRS on i.i.d. drafts WITHOUT skipping repeated tokens (repeat: q_j(x) = 0, ratio infinite)."""
    node = lambda view: walk.sibling_loop(view, rrs.conditional_rule, skip_duplicates=False)
    return walk.walk(tree, target_logits, key, sampling, node)


def fresh(verifier):
    """A new function object: a separate jit cache entry, so monkeypatches are traced in."""
    return lambda *a: verifier(*a)


CONTROLS = {}


def control(fn):
    CONTROLS[fn.__name__] = fn
    return fn


@control
def mss_on_without_replacement(mp):
    """Wrong q: MSS's unconditional q for siblings drawn without replacement."""
    return check(get("specinfer"), (3, 2), Drafting("without_replacement", label="iid"), T1)


@control
def draft_temperature_mismatch(mp):
    """Wrong q: drafts drawn at temperature 1.5, ratio computed with the temperature-1 q."""
    return check(get("rrs"), (3, 2), Drafting(draft_temperature=1.5), T1)


@control
def topk_drafts_as_sampled(mp):
    """Wrong q: top-k (deterministic) drafts verified with min(1, p/q) as if they were sampled."""
    return check(get("rrs"), (3, 2), Drafting("deterministic", label="without_replacement"), T1)


@control
def iid_rrs_without_duplicate_skip(mp):
    """i.i.d. drafts through RRS without skipping repeated tokens."""
    return check(rrs_no_skip, (4,), IID, T07K)


@control
def block_first_failure(mp):
    """Block verification's thresholds with token verification's stopping rule (the prefix before
    the first failing coin instead of the longest passing prefix): a biased half-conversion."""
    mp.setattr(block, "longest_passing", lambda passed: jnp.sum(jnp.cumprod(passed, axis=1), axis=1))
    return check(fresh(get("block")), (1, 1, 1), WOR, T1)


@control
def resorted_siblings(mp):
    """Siblings verified in q order instead of the order they were drawn in."""
    return check(get("rrs"), (3,), Drafting(resort=True), T13P)


@control
def shared_sibling_uniform(mp):
    """One uniform shared by all siblings: node j's coin is its parent's slot's."""
    parents = parents_of((3, 2))
    mp.setattr(walk, "uniforms", lambda k, b, n: broken_uniforms(k, b, n, parents))
    return check(fresh(get("rrs")), (3, 2), WOR, T1)


@control
def coins_reused_across_depths(mp):
    """Coins reused across depths: node j's coin depends on its sibling rank only."""
    rank = sibling_rank((3, 2))
    mp.setattr(walk, "uniforms", lambda k, b, n: broken_uniforms(k, b, n, rank))
    return check(fresh(get("rrs")), (3, 2), WOR, T1)


@control
def key_reused_across_steps(mp):
    """The same verification key in two consecutive decoding steps."""
    return check(get("rrs"), (2, 1), WOR, T1, steps=2, reuse=True)


@control
def kseq_rho_one(mp):
    """K-SEQ with rho = 1 ("accept each draft with min(1, p/q)") instead of rho*."""
    mp.setattr(spectr, "solve_rho", lambda p, q, k: jnp.float32(1.0))
    return check(fresh(get("spectr")), (4,), IID, T1)


@pytest.mark.parametrize("name", list(CONTROLS))
def test_negative_control_is_detected(name, monkeypatch):
    res = CONTROLS[name](monkeypatch)
    print(f"{name}: bonferroni {res.bonferroni:.3g} combined {res.combined:.3g} impossible {res.impossible}")
    assert res.worst < FAIL_P, res


def test_typical_acceptance_is_not_lossless():
    """The LOSSY label is honest: typical acceptance fails the same chi-square test."""
    res = check(get("typical"), (3, 2), WOR, T1)
    print(f"typical: bonferroni {res.bonferroni:.3g} combined {res.combined:.3g} impossible {res.impossible}")
    assert res.worst < FAIL_P, res


@pytest.mark.parametrize("residual", ["official", "exact"])
def test_rapid_is_not_lossless_above_eta_zero(residual):
    """RAPID's retrieval-augmented target (eta > 0) is labelled lossy, and fails the harness against
    the target with either residual (the exact one follows p_hat instead of p)."""
    verifier = get(f"rapid:eta=5,residual={residual}")
    assert verifier.LOSSLESS is False and get("rapid:eta=0").LOSSLESS is True
    res = check(verifier, (1, 1), WOR, T1)
    print(f"rapid {residual}: bonferroni {res.bonferroni:.3g} combined {res.combined:.3g}")
    assert res.worst < FAIL_P, res

"""Block verification's acceptance law on exact toy worlds (its losslessness is checked by the
chi-square harnesses: tests/test_verifiers_stats.py, tests/test_spec_stats.py, with the first-failure
half-conversion as a negative control in tests/test_verifiers_controls.py)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.verifiers import get_verifier


def test_block_verification_accepts_its_expected_length_and_dominates_token_verification():
    """Block verification accepts a prefix of length >= i with probability E_q[w_i] (w_i: the capped
    running ratio min(1, w_{i-1} r_i)), token verification with E_q[prod_j min(1, r_j)] <= that. On 8
    random worlds (target and draft laws per position, V = 6, 3 drafts), every row drafting its own
    chain from q (4000 rows a world), the mean accepted lengths match the exact expectations (all
    6^3 drafts enumerated), and block's is the larger in every world."""
    vocab, gamma, worlds, rows = 6, 3, 8, 4000
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(worlds, gamma + 1, vocab)) * 1.5
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1), np.float64)
    q = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(worlds, gamma + 1, vocab)) * 1.5), -1))
    q = q.astype(np.float64)
    exact = {"block": np.zeros(worlds), "speculative": np.zeros(worlds)}
    for xs in itertools.product(range(vocab), repeat=gamma):  # every draft, weighted by q
        prob = np.prod([q[:, i, x] for i, x in enumerate(xs)], axis=0)
        w_block, w_token = np.ones(worlds), np.ones(worlds)
        for i, x in enumerate(xs):
            r = p[:, i, x] / q[:, i, x]
            w_block, w_token = np.minimum(1.0, w_block * r), w_token * np.minimum(1.0, r)
            exact["block"] += prob * w_block
            exact["speculative"] += prob * w_token
    cum = np.cumsum(q[:, :gamma], axis=-1)
    x = (rng.random((worlds, rows, gamma, 1)) > cum[:, None]).sum(-1)  # [worlds, rows, gamma] ~ q
    tokens = np.concatenate([np.zeros((worlds, rows, 1), np.int64), x], axis=2).reshape(-1, gamma + 1)
    rep = lambda a: jnp.asarray(np.repeat(a, rows, axis=0), jnp.float32)  # noqa: E731
    chain = Tree.chain(jnp.asarray(tokens, jnp.int32), draft_probs=rep(q), sibling_mode="without_replacement")
    se = np.sqrt(gamma**2 / 4 / rows)  # a bound on the standard error of a mean of values in [0, gamma]
    for name in ("block", "speculative"):
        v = jax.jit(get_verifier(name), static_argnums=3)(
            chain, rep(logits), jax.random.key(5), SamplingConfig(1.0)
        )
        mean = np.asarray(v.n_accepted, np.float64).reshape(worlds, rows).mean(1)
        np.testing.assert_array_less(np.abs(mean - exact[name]), 4 * se, err_msg=name)
    assert (exact["block"] >= exact["speculative"] - 1e-12).all()
    assert (exact["block"] - exact["speculative"]).max() > 0.02  # strictly better somewhere

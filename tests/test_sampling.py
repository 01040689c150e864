"""Logits processing: top-k / top-p masks, and sampled frequencies match the processed distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from specdec.sampling import SamplingConfig, inverse_cdf, probabilities, process_logits, sample


def test_top_k_and_top_p_masks():
    logits = jnp.log(jnp.array([0.4, 0.3, 0.15, 0.1, 0.05]))
    kept = lambda s: np.isfinite(np.asarray(process_logits(logits, s)))
    np.testing.assert_array_equal(kept(SamplingConfig(1.0, top_k=2)), [1, 1, 0, 0, 0])
    # mass before token i: 0, .4, .7, .85, .95 -> top_p=0.7 keeps the first two, 0.71 three
    np.testing.assert_array_equal(kept(SamplingConfig(1.0, top_p=0.7)), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(kept(SamplingConfig(1.0, top_p=0.71)), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(kept(SamplingConfig(1.0, top_p=0.01)), [1, 0, 0, 0, 0])
    p = probabilities(logits, SamplingConfig(1.0, top_k=3))
    np.testing.assert_allclose(p, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], rtol=1e-5)
    np.testing.assert_array_equal(probabilities(logits, SamplingConfig()), [1, 0, 0, 0, 0])


def test_top_p_bisection_matches_a_sort():
    # The kept set by bisection = the sorted definition (numpy, float64 cumulative mass), over peaked
    # and flat rows of a 49k-like vocabulary and rows with tied logits; top_p = 1 - 1e-6 keeps ~all.
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.normal(0, s, (16, 4096)) for s in (0.3, 2.0, 6.0)]).astype(np.float32)
    rows[:4] = np.round(rows[:4] * 2) / 2  # many ties
    for top_p in (0.05, 0.5, 0.9, 0.99, 1 - 1e-6):
        got = np.isfinite(np.asarray(process_logits(jnp.asarray(rows), SamplingConfig(1.0, top_p=top_p))))
        for x, g in zip(rows, got, strict=True):
            order = np.argsort(-x, kind="stable")
            p = np.exp(x[order] - x.max(), dtype=np.float64)
            p /= p.sum()
            n = int(np.searchsorted(np.cumsum(p) - p, top_p, side="left"))  # mass before < top_p
            want = x >= x[order[max(n, 1) - 1]]
            # float32 mass sums may differ from float64 only in tokens of negligible mass at the edge
            pr = np.exp(x - x.max(), dtype=np.float64) / np.exp(x - x.max(), dtype=np.float64).sum()
            assert g[order[0]] and pr[g != want].sum() < 2e-6, (top_p, g.sum(), want.sum())


@pytest.mark.parametrize(
    "s", [SamplingConfig(0.7), SamplingConfig(1.3, top_k=5), SamplingConfig(1.0, top_p=0.8)]
)
def test_sampled_frequencies_match_probabilities(s):
    logits = jax.random.normal(jax.random.key(0), (8,)) * 1.5
    p = np.asarray(probabilities(logits, s), np.float64)
    n = 40_000
    draws = np.asarray(sample(jax.random.key(1), jnp.broadcast_to(logits, (n, 8)), s))
    counts = np.bincount(draws, minlength=8)
    support = p > 0
    assert counts[~support].sum() == 0
    _, pval = stats.chisquare(counts[support], p[support] / p[support].sum() * n)
    assert pval > 1e-3


def test_inverse_cdf_never_draws_a_zero_mass_token():
    # zero mass at both ends and in the middle; u at the extremes of [0, 1)
    p = jnp.array([0.0, 0.3, 0.0, 0.7, 0.0, 0.0])
    u = jnp.array([0.0, 0.2999, 0.3, 0.5, np.nextafter(np.float32(1), np.float32(0))])
    np.testing.assert_array_equal(inverse_cdf(u, jnp.broadcast_to(p, (5, 6))), [1, 1, 3, 3, 3])
    # unnormalised mass draws the same tokens
    u = jnp.array([0.0, 0.2, 0.5, 0.999])
    np.testing.assert_array_equal(inverse_cdf(u, jnp.broadcast_to(p * 7, (4, 6))), [1, 1, 3, 3])


def test_invalid_configs():
    for kw in [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ValueError):
            SamplingConfig(**kw)

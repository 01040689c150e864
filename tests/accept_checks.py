"""Shared checks of acceptance-head examples against what the drafter computes in the loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from specdec.cache import causal_mask
from specdec.drafters import checkpoint as ckpt
from specdec.models import forward

from .conftest import ACCEPT_TAPS


def target_view(params, cfg, toks, drafter_taps):
    """(the target's logits [1, n, V] from its final state as cached, the drafter's taps as cached)
    for one sequence `toks` [1, n] of the `accept_tiny` target."""
    n = toks.shape[1]
    _, taps, _ = forward(params, cfg, toks, jnp.arange(n)[None], None, causal_mask(1, n), taps=ACCEPT_TAPS)
    taps = tuple(t.astype(jnp.float16).astype(jnp.float32) for t in taps)  # as a feature set caches them
    return taps[2] @ ckpt.target_head(params), tuple(taps[t] for t in drafter_taps)


def assert_label_and_conf(e: dict, key: str, draft_logits, target_logits):
    """Example `e` of head `key`: conf = q(y) under the drafter's logits for the node; at T = 0, y
    is their top-1 and the label 1[y == the target's argmax]; at T = 1 the label is min(1, p/q)."""
    y = int(e["token"])
    q = jax.nn.softmax(draft_logits)
    np.testing.assert_allclose(e["conf"], q[y], rtol=2e-3, atol=1e-6)
    if key == "t0":
        assert y == int(jnp.argmax(draft_logits))
        assert e["label"] == float(y == int(jnp.argmax(target_logits)))
    else:
        p = jax.nn.softmax(target_logits)
        np.testing.assert_allclose(e["label"], min(1.0, float(p[y] / q[y])), rtol=5e-3, atol=1e-6)

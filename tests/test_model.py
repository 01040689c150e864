"""The JAX target model against transformers (torch) on tiny random Llama / Mistral / Qwen2 models.

The oracle tests skip without torch (the `tiny_models` fixture needs it); the module itself imports
without torch, since test_cache.py borrows its tree helpers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import KVCache, causal_mask
from specdec.models import forward, to_device
from tests.conftest import ARCHS, VOCAB

TOL = 1e-4


def _hf_logits(model, tokens: np.ndarray, **kw):
    import torch  # the tests calling this take `tiny_models`, which skips without torch

    with torch.no_grad():
        return model(torch.tensor(tokens), **kw)


def _ours(loaded, **overrides):
    cfg = loaded.cfg.replace(**overrides)
    return to_device(loaded.params, cfg), cfg


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_and_taps_match_hf(tiny_models, arch):
    hf, loaded = tiny_models[arch]
    params, cfg = _ours(loaded)
    toks = np.random.RandomState(1).randint(0, VOCAB, (2, 12))
    ref = _hf_logits(hf, toks, output_hidden_states=True)
    taps = tuple(range(cfg.num_layers + 1))
    logits, hidden, _ = forward(
        params, cfg, jnp.asarray(toks), jnp.broadcast_to(jnp.arange(12), (2, 12)), None,
        causal_mask(2, 12), taps=taps,
    )  # fmt: skip
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=TOL)
    for i in taps:
        np.testing.assert_allclose(hidden[i], ref.hidden_states[i].numpy(), atol=TOL, err_msg=f"tap {i}")


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("scan", [False, True])
def test_incremental_decode_with_cache_matches_hf(tiny_models, arch, scan):
    hf, loaded = tiny_models[arch]
    params, cfg = _ours(loaded, scan_layers=scan)
    toks = np.random.RandomState(2).randint(0, VOCAB, (1, 14))
    ref = _hf_logits(hf, toks).logits.numpy()
    cache = KVCache.init(cfg, 1, 32)
    outs = []
    # a 6-token prompt block, then a 3-token chain block, then single tokens
    for lo, hi in [(0, 6), (6, 9)] + [(t, t + 1) for t in range(9, 14)]:
        n = hi - lo
        logits, _, cache = forward(
            params, cfg, jnp.asarray(toks[:, lo:hi]), jnp.arange(lo, hi)[None], cache, causal_mask(1, n)
        )
        cache = cache.advance(n)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, 1), ref, atol=TOL)


# A depth-3 tree: node 0 is the root (last committed token); parents index earlier nodes.
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, 3, 5]


def tree_ancestors(parents):
    n = len(parents)
    anc = np.eye(n, dtype=bool)
    depth = np.zeros(n, np.int32)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
            depth[i] = depth[p] + 1
    return anc, depth


def root_path(parents, i):
    path = [i]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tree_block_matches_hf_on_each_root_to_node_path(tiny_models, arch):
    hf, loaded = tiny_models[arch]
    params, cfg = _ours(loaded)
    rng = np.random.RandomState(3)
    prefix = rng.randint(0, VOCAB, 7)
    tree_tokens = rng.randint(0, VOCAB, len(TREE_PARENTS))
    anc, depth = tree_ancestors(TREE_PARENTS)
    cache = KVCache.init(cfg, 1, 40)
    _, _, cache = forward(
        params, cfg, jnp.asarray(prefix[None]), jnp.arange(7)[None], cache, causal_mask(1, 7)
    )
    cache = cache.advance(7)
    logits, _, _ = forward(
        params,
        cfg,
        jnp.asarray(tree_tokens[None]),
        jnp.asarray(7 + depth)[None],
        cache,
        jnp.asarray(anc)[None],
    )
    for i in range(len(TREE_PARENTS)):
        seq = np.concatenate([prefix, tree_tokens[root_path(TREE_PARENTS, i)]])
        ref = _hf_logits(hf, seq[None]).logits.numpy()[0, -1]
        np.testing.assert_allclose(logits[0, i], ref, atol=TOL, err_msg=f"node {i}")


def test_logits_idx_selects_positions(tiny_targets):
    loaded = tiny_targets["llama"]
    params, cfg = _ours(loaded)
    toks = jnp.asarray(np.random.RandomState(4).randint(0, VOCAB, (2, 9)))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    full, _, _ = forward(params, cfg, toks, pos, None, causal_mask(2, 9))
    idx = jnp.array([[8], [3]])
    part, _, _ = forward(params, cfg, toks, pos, None, causal_mask(2, 9), logits_idx=idx)
    np.testing.assert_allclose(part[:, 0], np.stack([full[0, 8], full[1, 3]]), atol=1e-6)

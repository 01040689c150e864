"""RAPID: the retrieval-augmented target distribution against a NumPy reference, the RAG drafter's
retrieval and its decode (greedy = AR, drafting from a shortened prompt), and the cache attention
kernel at 8K positions against the dense reference. (The chi-square harness: eta = 0 passes in
test_verifiers_stats.py, eta > 0 fails in test_verifiers_controls.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import KVCache
from specdec.drafters import parse_drafter
from specdec.drafters.rag import RagDraft, bm25, chunks, draft_params, shorten
from specdec.generate import generate
from specdec.models import to_device
from specdec.models.config import ModelConfig
from specdec.trees import parse_tree
from specdec.verifiers import get_verifier
from specdec.verifiers.rapid import p_hat


def np_p_hat(p, q, eta, alpha):
    m = q >= alpha * q.max()
    g = np.where(m, p - q, 0.0)
    z = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)) - eta * g, -np.inf)
    e = np.exp(z - z.max())
    return e / e.sum()


def test_p_hat_equals_a_numpy_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.dirichlet(np.ones(7) * 0.5)
        p[rng.random(7) < 0.2] = 0.0
        p /= p.sum()
        q = rng.dirichlet(np.ones(7) * 0.5)
        for eta, alpha in [(0.0, 0.1), (5.0, 0.1), (20.0, 0.3), (5.0, 0.0)]:
            got = np.asarray(p_hat(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32), eta, alpha))
            np.testing.assert_allclose(got, np_p_hat(p, q, eta, alpha), atol=1e-6)
        np.testing.assert_allclose(np.asarray(p_hat(jnp.asarray(p), jnp.asarray(p), 9.0, 0.1)), p, atol=1e-6)
    bad = np.asarray(p_hat(jnp.asarray([0.5, 0.5, 0.0]), jnp.asarray([0.1, 0.1, 0.8]), 5.0, 0.5))
    assert bad[2] == 0.0  # the mask keeps only tokens the drafter finds plausible; p's zeros stay zero


def test_retrieval_keeps_the_relevant_chunks_in_order():
    count = lambda s: len(s.split())  # noqa: E731 - words as tokens
    filler = ["The weather was mild and the market was quiet that day." for _ in range(30)]
    doc = filler[:10] + ["The access code of the amber vault is 48213."] + filler[10:]
    text = "\n\n".join(doc) + "\n\nWhat is the access code of the amber vault?"
    short = shorten(text, count, budget=40, chunk=12)
    assert "48213" in short and short.endswith("amber vault?") and count(short) <= 40
    assert shorten("short text\n\nquestion?", count, budget=40, chunk=12) == "short text\n\nquestion?"
    assert all(count(c) <= 12 for c in chunks("\n\n".join(filler), count, 12))
    scores = bm25(["amber vault code", "weather market"], "amber vault")
    assert scores[0] > scores[1] == 0.0


def test_rag_drafter_greedy_equals_ar_and_drafts_from_its_own_prompt(tiny_targets):
    loaded = tiny_targets["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    params = to_device(loaded.params, cfg)
    prompts = [list(range(20, 60)), [5, 9, 3, 5, 9, 3, 5, 9] * 3]
    ar = generate(params, cfg, prompts, max_new_tokens=12).tokens
    d, base = parse_drafter("rag:target,budget=16", params, cfg, max_depth=3)
    assert isinstance(d, RagDraft) and d.budget == 16
    with pytest.raises(ValueError, match="shortened prompts"):
        generate(
            params,
            cfg,
            prompts,
            max_new_tokens=4,
            drafter=d,
            draft_params=base,
            builder=parse_tree("chain:3"),
        )
    # The target drafting for itself from the last 16 prompt tokens: lossless, and it accepts.
    dp = draft_params(base, [p[-16:] for p in prompts], bucket=8)
    out = generate(params, cfg, prompts, max_new_tokens=12, drafter=d, draft_params=dp,
                   builder=parse_tree("chain:3"), check=True)  # fmt: skip
    assert out.tokens == ar and out.tau > 1.0
    # After the prefill the drafter holds the shortened prompt + the root: its next-token logits are
    # a plain forward's over exactly those tokens
    from specdec.cache import causal_mask
    from specdec.context import Context
    from specdec.models import forward

    root = [r[0] for r in ar]
    ctx = Context(jnp.asarray([p + [x] + [0] * (40 - len(p)) for p, x in zip(prompts, root, strict=True)]),
                  jnp.asarray([len(p) + 1 for p in prompts]))  # fmt: skip
    state = d.init(dp, ctx, None, (), 64, window=4)
    for i, p in enumerate(prompts):
        seq = jnp.asarray([p[-16:] + [root[i]]])
        ref, _, _ = forward(params, cfg, seq, jnp.arange(17)[None], None, causal_mask(1, 17))
        np.testing.assert_allclose(state.root_logits[i], ref[0, -1], atol=1e-4)
    # Its whole prompt as the shortened one, padded longer: the target drafting for itself accepts
    # every draft (a misplaced offset would draft from the wrong tokens)
    dp = draft_params(base, prompts)
    full = generate(params, cfg, prompts, max_new_tokens=12, drafter=d, draft_params=dp,
                    builder=parse_tree("chain:3"))  # fmt: skip
    assert full.tokens == ar and full.accepted_hist[1:3] == [0, 0]  # (11 tokens: steps of 4, 4, 3)
    # RAPID's verifier at eta > 0 collapses to greedy at temperature 0 (p is one-hot)
    out = generate(params, cfg, prompts, max_new_tokens=12, drafter=d, draft_params=dp,
                   builder=parse_tree("chain:3"), verifier=get_verifier("rapid:eta=5"))  # fmt: skip
    assert out.tokens == ar


def test_cache_attention_at_8k_positions_equals_dense():
    """Verification blocks over a cache filled to ~8K positions (SmolLM2's context): the CPU
    kernel (or its fallback) equals the dense masked attention."""
    from specdec.attention import attend, attend_cache

    cfg = ModelConfig(arch="llama", vocab_size=8, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=8)  # fmt: skip
    b, t, s = 2, 5, 8320
    ks = jax.random.split(jax.random.key(1), 3)
    cache = KVCache.init(cfg, b, s)
    k, v = jax.random.normal(ks[0], cache.k.shape), jax.random.normal(ks[1], cache.v.shape)
    cache = cache.replace(k=k, v=v, lengths=jnp.array([8186, 4097]))
    q = jax.random.normal(ks[2], (b, t, 4, 8))
    tree = np.zeros((t, t), bool)
    for i, anc in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 2, 4]]):
        tree[i, anc] = True
    mask = cache.attention_mask(jnp.broadcast_to(jnp.asarray(tree), (b, t, t)))
    dense = attend(q, cache.k[0], cache.v[0], mask, cfg)
    got = attend_cache(q, cache, 0, mask, cfg, kernel=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=2e-5, atol=2e-5)
    near = mask & (jnp.arange(s) >= 4000)[None, None, :]  # negative control: the far prefix hidden
    assert np.abs(np.asarray(attend_cache(q, cache, 0, near, cfg, kernel=True) - dense)).max() > 1e-2

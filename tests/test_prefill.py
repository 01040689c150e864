"""Chunked prefill: at up to 8K positions the cache and attention equal one dense block's, drafters'
prefills chunk the same way, and long prompts decode losslessly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec import kernels
from specdec.cache import KVCache, causal_mask
from specdec.drafters import DraftModel, eagle
from specdec.drafters import checkpoint as ckpt
from specdec.generate import generate, prompt_block
from specdec.models import ModelConfig, forward, to_device
from specdec.models.llama import prefill
from specdec.prefill import KERNEL_CHUNK, chunk_for, prefill_blocks
from specdec.trees import parse_tree
from tests.sharded_worker import random_params

LONG = 8192


@pytest.fixture(scope="module")
def long_target(tiny_targets):
    loaded = tiny_targets["llama"]
    cfg = loaded.cfg.replace(max_position_embeddings=LONG + 64, eos_token_ids=())
    return loaded.params, cfg


def _layouts(params, cfg):
    """(params the product runs: packed with the CPU kernel where built, the dense reference)."""
    fast = to_device(params, cfg, "packed" if kernels.available() else "plain")
    return fast, to_device(params, cfg, "plain")


def test_chunked_prefill_equals_one_dense_block_at_8k_positions():
    # one KV head of two query heads: the dense reference's [T, S] scores at 8K are the cost here
    cfg = ModelConfig(arch="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=16, intermediate_size=64, max_position_embeddings=LONG + 64)  # fmt: skip
    fast, dense = _layouts(random_params(cfg, 0), cfg)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, LONG)), jnp.int32)
    size, last = LONG + 16, jnp.array([[LONG - 1]])
    assert chunk_for(LONG, kernels.available()) is not None  # the product path chunks this prompt
    cache = KVCache.init(cfg, 1, size)
    run = lambda p, chunk: prefill(p, cfg, prompt, cache, taps=(1,), last=last, chunk=chunk)
    logits, taps, cache = jax.jit(lambda p: run(p, "auto"))(fast)
    ref_logits, ref_taps, ref_cache = jax.jit(lambda p: run(p, None))(dense)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(taps[0], ref_taps[0], atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(cache.k[:, :, :LONG], ref_cache.k[:, :, :LONG], atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(cache.v[:, :, :LONG], ref_cache.v[:, :, :LONG], atol=2e-4, rtol=2e-4)
    assert int(cache.lengths[0]) == 0  # written, not advanced: the caller commits the prompt

    # the next token attends over all 8K committed slots: the CPU kernel's answer equals XLA's
    nxt, pos = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), jnp.array([[LONG]])
    step = jax.jit(lambda p, c: forward(p, cfg, nxt, pos, c.advance(LONG), causal_mask(1, 1))[0])
    np.testing.assert_allclose(step(fast, cache), step(dense, ref_cache), atol=2e-4, rtol=2e-4)


def test_ragged_rows_prefill_in_chunks_like_one_block(long_target):
    params, cfg = long_target
    fast, _ = _layouts(params, cfg)
    rng = np.random.default_rng(1)
    t, lens = 2048, jnp.array([2048, 1300])
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, t)), jnp.int32)
    last = (lens - 1)[:, None]
    cache = KVCache.init(cfg, 2, t + 16)
    run = jax.jit(lambda chunk: prefill(fast, cfg, prompt, cache, last=last, chunk=chunk), static_argnums=0)
    (logits, _, cache), (ref, _, ref_cache) = run(KERNEL_CHUNK), run(None)
    np.testing.assert_allclose(logits, ref, atol=2e-4, rtol=2e-4)
    for row, n in enumerate(lens.tolist()):  # slots past a row's prompt hold padding either way
        np.testing.assert_allclose(cache.k[:, row, :n], ref_cache.k[:, row, :n], atol=2e-4, rtol=2e-4)


def test_feature_drafter_layer_prefills_in_chunks(long_target):
    """EAGLE's draft layer over the prompt's (token, feature) pairs at positions 1..T, as its init
    runs it: chunked equals one block."""
    params, cfg = long_target
    fast, _ = _layouts(params, cfg)
    c = eagle.EagleConfig.for_target(cfg, 1)
    dp = ckpt.bind("eagle", c, eagle.init_params(c, jax.random.PRNGKey(2)), fast)
    t = 1024
    rng = np.random.default_rng(3)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t)), jnp.int32)
    feat = jnp.asarray(rng.normal(0, 1, (1, t, cfg.hidden_size)), jnp.float32)
    run = lambda x, p, cache, m: eagle.run_layer(dp, c, *x, p, cache, m)
    cache = KVCache.init(c.layer_cfg, 1, t + 8)
    go = jax.jit(lambda chunk: prefill_blocks(run, (toks, feat), cache, kernel=True, start=1, chunk=chunk),
                 static_argnums=0)  # fmt: skip
    (out, cache), (ref, ref_cache) = go(128), go(None)
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(cache.k[:, :, :t], ref_cache.k[:, :, :t], atol=2e-4, rtol=2e-4)


def test_long_prompt_speculation_equals_ar(long_target):
    """A 1.5K-token prompt (chunked prefill of the target and of the draft model) decodes greedily
    to the AR tokens."""
    params, cfg = long_target
    fast, _ = _layouts(params, cfg)
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, cfg.vocab_size, 1500).tolist()
    ar = generate(fast, cfg, [prompt], max_new_tokens=12).tokens
    spec = generate(fast, cfg, [prompt], max_new_tokens=12, drafter=DraftModel(cfg), draft_params=fast,
                    builder=parse_tree("chain:3"), check=True).tokens  # fmt: skip
    assert spec == ar


def test_prompt_block_and_refusal():
    assert [prompt_block(n) for n in (1, 17, 1000, 1025, 5900)] == [16, 32, 1024, 2048, 6144]
    cfg = ModelConfig(arch="llama", vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=4, intermediate_size=16)  # fmt: skip
    cache = KVCache.init(cfg, 1, 400)
    with pytest.raises(ValueError, match="does not divide"):
        prefill_blocks(lambda x, p, c, m: (x, c), jnp.zeros((1, 300), jnp.int32), cache, kernel=True,
                       chunk=128)  # fmt: skip

"""KVCache: block writes at per-row offsets, masks, rollback by length, and tree-path commit."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import KVCache, causal_mask
from specdec.models import ModelConfig, forward, to_device
from tests.conftest import VOCAB
from tests.test_model import TREE_PARENTS, root_path, tree_ancestors

CFG = ModelConfig(
    arch="llama", vocab_size=11, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
    head_dim=4, intermediate_size=16,
)  # fmt: skip


def test_write_at_per_row_offsets_and_drop_past_end():
    cache = KVCache.init(CFG, 2, 6).replace(lengths=jnp.array([1, 4]))
    new = jnp.arange(1, 4, dtype=jnp.float32)[None, :, None, None] * jnp.ones((2, 3, 1, 4))
    cache = cache.write(1, new, new)
    k = np.asarray(cache.k[1, :, :, 0, 0])
    np.testing.assert_array_equal(k[0], [0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(k[1], [0, 0, 0, 0, 1, 2])  # the third token fell off the end: dropped
    assert np.all(np.asarray(cache.k[0]) == 0)  # other layers untouched
    np.testing.assert_array_equal(cache.lengths, [1, 4])  # writing never moves lengths


def test_attention_mask_combines_prefix_and_block_mask():
    cache = KVCache.init(CFG, 1, 7).replace(lengths=jnp.array([3]))
    anc, _ = tree_ancestors([-1, 0, 0])
    mask = np.asarray(cache.attention_mask(jnp.asarray(anc)[None]))[0]
    expected = np.array(
        [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 1, 0]], dtype=bool
    )  # node 2 sees the root but not its sibling; stale slot 6 is never visible
    np.testing.assert_array_equal(mask, expected)


def test_commit_moves_path_to_contiguous_slots():
    cache = KVCache.init(CFG, 2, 8).replace(lengths=jnp.array([2, 1]))
    block = jnp.arange(1, 6, dtype=jnp.float32)[None, :, None, None] * jnp.ones((2, 5, 1, 4))
    for layer in range(2):
        cache = cache.write(layer, block, -block)
    path = jnp.array([[0, 2, 4], [0, 1, 3]])
    out = cache.commit(path, jnp.array([3, 2]))
    np.testing.assert_array_equal(out.lengths, [5, 3])
    np.testing.assert_array_equal(out.k[0, 0, 2:5, 0, 0], [1, 3, 5])
    np.testing.assert_array_equal(out.k[1, 1, 1:3, 0, 0], [1, 2])
    np.testing.assert_array_equal(out.v[1, 0, 2:5, 0, 0], [-1, -3, -5])


def test_commit_then_step_equals_model_that_only_saw_the_path(tiny_targets):
    """After verifying a tree and committing one root-to-leaf path, the next step's logits equal
    those of a model that only ever saw prefix + path."""
    loaded = tiny_targets["qwen2"]
    cfg = loaded.cfg
    params = to_device(loaded.params, cfg)
    rng = np.random.RandomState(5)
    prefix = rng.randint(0, VOCAB, (2, 6))
    tree_tokens = rng.randint(0, VOCAB, (2, len(TREE_PARENTS)))
    anc, depth = tree_ancestors(TREE_PARENTS)
    leaves = [6, 4]  # row 0 keeps path 0-1-3-6, row 1 keeps 0-1-4
    paths = [root_path(TREE_PARENTS, leaf) for leaf in leaves]
    path_arr = np.zeros((2, 4), np.int32)
    for b, p in enumerate(paths):
        path_arr[b, : len(p)] = p
    cache = KVCache.init(cfg, 2, 32)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    _, _, cache = forward(params, cfg, jnp.asarray(prefix), pos, cache, causal_mask(2, 6))
    cache = cache.advance(6)
    _, _, cache = forward(
        params, cfg, jnp.asarray(tree_tokens), jnp.asarray(6 + np.stack([depth, depth])),
        cache, jnp.asarray(np.stack([anc, anc])),
    )  # fmt: skip
    cache = cache.commit(jnp.asarray(path_arr), jnp.array([len(p) for p in paths]))
    nxt = rng.randint(0, VOCAB, (2, 1))
    logits, _, _ = forward(params, cfg, jnp.asarray(nxt), cache.lengths[:, None], cache, causal_mask(2, 1))
    for b, p in enumerate(paths):
        seq = np.concatenate([prefix[b], tree_tokens[b, p], nxt[b]])[None]
        t = seq.shape[1]
        ref, _, _ = forward(params, cfg, jnp.asarray(seq), jnp.arange(t)[None], None, causal_mask(1, t))
        np.testing.assert_allclose(logits[b, 0], ref[0, -1], atol=1e-5)


def test_split_prefix_attention_equals_dense_attention():
    """Committed prefix and new block attended apart and merged by log-sum-exp = one masked pass."""
    import jax

    from specdec.attention import attend, attend_split

    cfg = ModelConfig(arch="llama", vocab_size=8, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=8)  # fmt: skip
    b, t, s = 3, 5, 16
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, 4, 8))
    k_new, v_new = jax.random.normal(ks[1], (2, b, t, 2, 8))
    cache = KVCache.init(cfg, b, s)
    kc, vc = jax.random.normal(ks[2], cache.k.shape), jax.random.normal(ks[3], cache.v.shape)
    cache = cache.replace(k=kc, v=vc, lengths=jnp.array([0, 4, 11]))  # a prefill row, two decode rows
    tree = np.zeros((t, t), bool)  # parents 0 <- 1, 2; 1 <- 3; 2 <- 4 (ancestors and self)
    for i, anc in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 2, 4]]):
        tree[i, anc] = True
    for block_mask in (causal_mask(b, t), jnp.broadcast_to(jnp.asarray(tree), (b, t, t))):
        written = cache.write(0, k_new, v_new)
        dense = attend(q, written.k[0], written.v[0], written.attention_mask(block_mask), cfg)
        split = attend_split(q, k_new, v_new, written, 0, block_mask, cfg)
        np.testing.assert_allclose(split, dense, rtol=1e-5, atol=1e-5)
        # the prefix half through Pallas's decode kernel (its interpreter here): same result
        flash = attend_split(q, k_new, v_new, written, 0, block_mask, cfg, flash=True)
        np.testing.assert_allclose(flash, dense, rtol=1e-5, atol=1e-5)
    # negative control: dropping the prefix half changes the result of the rows that have one
    lone = attend(q, k_new, v_new, block_mask, cfg)
    assert np.abs(np.asarray(lone - dense)[1:]).max() > 1e-2 and np.allclose(lone[0], dense[0], atol=1e-5)


def test_split_attention_decodes_like_dense_attention():
    from specdec.drafters import layer_skip
    from specdec.generate import generate
    from specdec.trees import parse_tree
    from tests.sharded_worker import CFG, random_params

    host = random_params(CFG, 0)
    prompts = [[5, 9, 3, 5, 9, 3], list(range(20, 41))]

    def decode(cfg):  # AR, then speculative with a dynamic tree
        params = to_device(host, cfg, "plain")
        d, dp = layer_skip(params, cfg, 1)
        return [generate(params, cfg, prompts, max_new_tokens=10).tokens,
                generate(params, cfg, prompts, max_new_tokens=10, drafter=d, draft_params=dp,
                         builder=parse_tree("dynamic:depth=3,topk=3,n=10")).tokens]  # fmt: skip

    dense, split = decode(CFG), decode(CFG.replace(attention="split"))
    assert split == dense and dense[0] == dense[1]


def test_flash_decode_runs_the_kernel(monkeypatch):
    """`attention="flash"` under speculative `generate`: the cache is sized to tile the kernel, the
    prefix half goes through Pallas's decode kernel (its calls are counted while tracing: a program
    traced before would not count them and fail here) and the tokens equal dense attention's. AR
    decoding with the kernel: tests/test_sharding.py's flash cases."""

    from specdec import attention
    from specdec.drafters import layer_skip
    from specdec.generate import generate
    from specdec.trees import parse_tree
    from tests.sharded_worker import CFG, random_params

    calls = []
    kernel = attention._prefix_flash_shard
    monkeypatch.setattr(attention, "_prefix_flash_shard", lambda *a: calls.append(a[1].shape) or kernel(*a))
    host = random_params(CFG, 0)
    prompts = [[5, 9, 3, 5, 9, 3], list(range(20, 41))]

    def decode(cfg):
        params = to_device(host, cfg, "plain")
        d, dp = layer_skip(params, cfg, 1)
        return generate(params, cfg, prompts, max_new_tokens=10, drafter=d, draft_params=dp,
                        builder=parse_tree("dynamic:depth=3,topk=3,n=10")).tokens  # fmt: skip

    dense = decode(CFG)
    assert not calls
    assert decode(CFG.replace(attention="flash")) == dense
    assert calls and all(attention.flash_splits(shape[1]) for shape in calls)  # K: [B, S, Hkv, Dh]


def test_flash_tiling():
    """Pallas's decode kernel tiles a cache of S slots as k_splits x (n = S / k_splits >= 16, a
    multiple of a power-of-two block in [16, 128]); other sizes are refused, never run another
    way, and `generate` sizes caches to tile (`flash_size`)."""
    from specdec.attention import flash_size, flash_splits
    from specdec.generate import PromptTooLongError, pad_prompts

    assert flash_splits(4096) == (16, 128) and flash_splits(48) == (1, 16) and flash_splits(96) == (2, 16)
    assert flash_splits(20) is None and flash_splits(8) is None
    assert [flash_size(n) for n in (1, 16, 33, 70)] == [16, 16, 48, 80]
    flash = CFG.replace(attention="flash")
    assert pad_prompts([[1, 2, 3]], flash, 16, window=5)[2] == 48  # 16 + 16 + 5, rounded up
    with pytest.raises(
        PromptTooLongError, match="does not tile the flash attention kernel; use cache_size=48"
    ):
        pad_prompts([[1, 2, 3]], flash, 16, cache_size=40)

"""Shared prompt prefixes (Hydragen): attention over shared levels equals dense attention over the
concatenated cache, decoding with sharing equals decoding without it (AR and every tree kind),
positions continue after the prefix, and nothing in the loop writes a shared level."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec import kernels
from specdec.attention import attend, attend_cache, attend_split
from specdec.cache import KVCache, SharedSegment
from specdec.decode import loop_jit, prefill_jit
from specdec.drafters import NGram, eagle, layer_skip
from specdec.drafters import checkpoint as ckpt
from specdec.generate import bucket, generate, pad_prompts, prompt_block
from specdec.models import ModelConfig, to_device
from specdec.models.llama import prefill
from specdec.prefix_sharing import MIN_SHARED, plan_sharing, prefill_shared, shared_prompt
from specdec.trees import parse_tree
from tests.sharded_worker import random_params

CFG = ModelConfig(arch="llama", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512,
                  eos_token_ids=())  # fmt: skip


def _rand(rng, *shape):
    return jnp.asarray(rng.normal(0, 1, shape), jnp.float32)


def _dense_reference(q, levels, own_k, own_v, filled, block_mask, cfg):
    """Each row's keys concatenated (its groups' prefixes, its own committed slots, the block),
    attended by `attend` under one explicit mask."""
    b, t = q.shape[:2]
    rows_k, rows_v, rows_m = [], [], []
    for r in range(b):
        ks, vs = [], []
        for seg in levels:
            g = r // (b // seg.groups)
            n = int(seg.lengths[g])
            ks.append(seg.k[0, g, :n])
            vs.append(seg.v[0, g, :n])
        f = int(filled[r])
        ks.append(own_k[0, r, : f + t])
        vs.append(own_v[0, r, : f + t])
        k, v = jnp.concatenate(ks), jnp.concatenate(vs)
        pre = k.shape[0] - t
        mask = jnp.concatenate([jnp.ones((t, pre), bool), block_mask[r]], axis=1)
        rows_k.append(k), rows_v.append(v), rows_m.append(mask)
    s = max(k.shape[0] for k in rows_k)
    pad = lambda x: jnp.pad(x, ((0, s - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))  # noqa: E731
    k = jnp.stack([pad(x) for x in rows_k])
    v = jnp.stack([pad(x) for x in rows_v])
    m = jnp.stack([jnp.pad(x, ((0, 0), (0, s - x.shape[1]))) for x in rows_m])
    return attend(q, k, v, m, cfg)


CASES = {
    # levels: (groups, capacity, lengths); own lengths per row (0: nothing of its own yet)
    "one level, empty own parts": ([(1, 16, [11])], [0, 0, 0, 0]),
    "one level, ragged": ([(2, 16, [16, 3])], [5, 0, 9, 2]),
    "two levels": ([(1, 16, [7]), (2, 8, [5, 0])], [3, 6, 0, 10]),
    "per-row level": ([(4, 8, [1, 8, 0, 4])], [2, 2, 7, 0]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", ["xla", "kernel", "split"])
def test_shared_attention_equals_dense_attention(case, path):
    if path == "kernel" and not kernels.available():
        pytest.skip("the CPU kernels are not built")
    levels_spec, filled = CASES[case]
    rng = np.random.default_rng(0)
    b, t, s = 4, 3, 16
    cfg = CFG.replace(num_layers=1, attention="split" if path == "split" else "dense")
    levels = tuple(
        SharedSegment(
            k=_rand(rng, 1, g, p, 2, 16), v=_rand(rng, 1, g, p, 2, 16), lengths=jnp.array(n, jnp.int32)
        )
        for g, p, n in levels_spec
    )
    filled = jnp.array(filled, jnp.int32)
    cache = KVCache(k=_rand(rng, 1, b, s, 2, 16), v=_rand(rng, 1, b, s, 2, 16), lengths=filled, shared=levels)
    cache = cache.replace(lengths=cache.base + filled)  # absolute: prefix tokens + own ones
    q, k_new, v_new = _rand(rng, b, t, 4, 16), _rand(rng, b, t, 2, 16), _rand(rng, b, t, 2, 16)
    tree = jnp.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)  # a root and two children
    block_mask = jnp.broadcast_to(tree, (b, t, t))
    written = cache.write(0, k_new, v_new)
    if path == "split":
        out = attend_split(q, k_new, v_new, written, 0, block_mask, cfg)
    else:
        out = attend_cache(q, written, 0, written.attention_mask(block_mask), cfg, kernel=path == "kernel")
    ref = _dense_reference(q, levels, written.k, written.v, filled, block_mask, cfg)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_plan_finds_levels_among_contiguous_rows():
    rng = np.random.default_rng(0)
    system, doc_a, doc_b = (rng.integers(0, 97, n).tolist() for n in (80, 70, 90))
    q = lambda: rng.integers(0, 97, 5).tolist()  # noqa: E731
    prompts = [system + doc_a + q(), system + doc_a + q(), system + doc_b + q(), system + doc_b + q()]
    plan = plan_sharing(prompts)
    assert plan.group_rows == (4, 2) and plan.lengths == ((80,), (70, 90))
    assert [plan.base(r) for r in range(4)] == [150, 150, 170, 170]
    assert plan.saved_tokens == 3 * 80 + 70 + 90
    # N samples of one prompt share all of it but its last token
    one = rng.integers(0, 97, 100).tolist()
    assert plan_sharing([one] * 3).lengths == ((99,),)
    # nothing worth sharing: one row, short common prefixes
    assert plan_sharing([one]) is None
    assert plan_sharing([one, one[: MIN_SHARED - 1] + [1, 2, 3]]) is None


@pytest.fixture(scope="module")
def target():
    params = to_device(random_params(CFG, 0), CFG)
    rng = np.random.default_rng(1)
    # one 70-token prefix (as a system prompt), then per-row tails of different lengths, repetitive
    # so that n-gram lookup finds matches
    prefix = rng.integers(3, 97, 70).tolist()
    tails = [[5, 9, 3, 5, 9, 3], [12, 13, 14, 12], [20, 21, 22, 23, 20, 21, 22], [7]]
    return params, [prefix + tail for tail in tails]


@pytest.fixture(scope="module")
def ar(target):
    """Greedy AR tokens without sharing."""
    params, prompts = target
    return generate(params, CFG, prompts, max_new_tokens=16, shared_prefix="off").tokens


def _pair(params, prompts, **kw):
    on = generate(params, CFG, prompts, max_new_tokens=16, **kw)
    off = generate(params, CFG, prompts, max_new_tokens=16, shared_prefix="off", **kw)
    assert on.shared_tokens == (len(on.tokens) - 1) * 70 and off.shared_tokens == 0  # one level, all rows
    return on, off


def test_greedy_ar_with_and_without_sharing(target):
    params, prompts = target
    on, off = _pair(params, prompts)
    assert on.tokens == off.tokens
    on, off = _pair(params, prompts, num_samples=2)  # and samples of each prompt, at T = 0 all alike
    assert on.tokens == off.tokens and on.tokens[0] == on.tokens[1] and len(on.tokens) == 8


# every tree kind with n-gram lookup; a draft model (partial acceptance) on a dynamic tree
CASES_SPEC = [("ngram", "chain:3"), ("ngram", "static:[(0,),(1,),(0,0),(0,1),(1,0),(0,0,0)]"),
              ("layerskip", "dynamic:depth=3,topk=3,n=10"), ("ngram", "rsd:2,2,1"),
              ("ngram", "chain:3+budget:2")]  # fmt: skip


@pytest.mark.parametrize("drafter,tree", CASES_SPEC)
def test_greedy_speculative_with_and_without_sharing(target, ar, drafter, tree):
    params, prompts = target
    builder = parse_tree(tree)
    d, dp = (
        (NGram(CFG.vocab_size, max_depth=builder.max_depth), None)
        if drafter == "ngram"
        else layer_skip(params, CFG, 1)
    )
    # (n-gram's and the draft model's drafts follow from the tokens alone: equal tokens, equal drafts;
    # EAGLE's come from the target's features and are compared below, run against run)
    on = generate(
        params, CFG, prompts, max_new_tokens=16, drafter=d, draft_params=dp, builder=builder, check=True
    )
    assert on.shared_tokens == 3 * 70 and on.tokens == ar


def test_feature_drafter_sees_the_prompt_features_of_the_unshared_prefill(target):
    # EAGLE starts from the target's hidden states of every prompt position: assembled from the
    # shared levels' and the rows' own prefills, they draft what the unshared prefill's would
    params, prompts = target
    c = eagle.EagleConfig.for_target(CFG, 1)
    dp = ckpt.bind("eagle", c, eagle.init_params(c, jax.random.PRNGKey(2)), params)
    d = eagle.Eagle(c)
    on, off = _pair(
        params, prompts, drafter=d, draft_params=dp, builder=parse_tree("dynamic:depth=3,topk=3,n=10")
    )
    assert (
        on.tokens == off.tokens
        and on.accepted_hist == off.accepted_hist
        and on.draft_calls == off.draft_calls
    )


def test_first_own_token_sits_right_after_the_prefix(target):
    params, prompts = target
    plan = plan_sharing(prompts)
    shared = shared_prompt(prompts, plan, 32, prompt_block)
    t = prompt_block(max(len(p) for p in prompts))
    _, _, cache = jax.jit(lambda p, s: prefill_shared(p, CFG, s, t))(params, shared)
    assert cache.base.tolist() == [70] * 4 and cache.lengths.tolist() == [70] * 4
    tokens, _, size = pad_prompts(prompts, CFG, 16)
    _, _, dense = jax.jit(lambda p: prefill(p, CFG, jnp.asarray(tokens), KVCache.init(CFG, 4, size)))(params)
    # keys carry RoPE: own slot i equals the unshared prefill's slot 70 + i, the prefix slot j its slot j
    for r, p in enumerate(prompts):
        n = len(p) - 70
        np.testing.assert_allclose(cache.k[:, r, :n], dense.k[:, r, 70 : 70 + n], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(cache.shared[0].k[:, 0, :70], dense.k[:, r, :70], atol=1e-5, rtol=1e-5)


def test_decoding_never_writes_the_shared_prefix(target):
    params, prompts = target
    d, dp = NGram(CFG.vocab_size, max_depth=3), None
    from specdec.compose import make_spec
    from specdec.sampling import SamplingConfig

    spec = make_spec(CFG, SamplingConfig(), d, parse_tree("dynamic:depth=3,topk=3,n=10"))
    tokens, lens, size = pad_prompts(prompts, CFG, 16, window=spec.cache_window)
    shared = shared_prompt(prompts, plan_sharing(prompts), bucket(16) + spec.cache_window, prompt_block)
    eos, new = jnp.array([-1]), jnp.int32(16)
    state = prefill_jit(params, dp, jnp.asarray(tokens), jnp.asarray(lens), jax.random.key(0), eos, new,
                        shared, spec=spec, cache_size=size)  # fmt: skip
    before = jax.tree.map(np.asarray, state.cache.shared)
    state = loop_jit(params, dp, state, eos, new, jnp.int32(16), spec=spec)
    assert int(state.steps) > 1 and int(state.accepted_hist[2:].sum()) > 0  # trees were committed
    for seg, ref in zip(state.cache.shared, before, strict=True):
        np.testing.assert_array_equal(seg.k, ref.k)
        np.testing.assert_array_equal(seg.v, ref.v)

"""Acceptance heads of Falcon (k tokens per pass): the examples are the drafter's own chain with
the draft token, read where `Falcon.expand` leaves it; the pipeline ships per-depth heads that the
`acceptance` member reads at the nodes; adaptive chains on them stay lossless."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import causal_mask
from specdec.context import Context
from specdec.drafters import accept_head, eagle, falcon
from specdec.drafters import checkpoint as ckpt
from specdec.generate import generate
from specdec.models import forward
from specdec.sampling import SamplingConfig
from specdec.train import accept_cache, features
from specdec.train.trainer import Batches
from specdec.tree import Tree
from specdec.trees import parse_tree

from .accept_checks import assert_label_and_conf, target_view

VOCAB = 48  # draft vocabulary


def _save(tiny, path, k: int = 2):
    """A random Falcon drafter over a draft vocabulary of VOCAB ids, saved as a checkpoint."""
    params, cfg, _, _ = tiny
    c = falcon.FalconConfig.for_target(cfg, 1, VOCAB, k=k)
    d2t = np.sort(np.random.default_rng(1).choice(cfg.vocab_size, VOCAB, replace=False)).astype(np.int32)
    raw = eagle.init_params(c, jax.random.PRNGKey(1), np.asarray(ckpt.target_head(params))[:, d2t])
    raw = {n: v for n, v in raw.items() if n not in ("embed", "head")}
    # attention that matters: a node's own pair must visibly change its pass's outputs
    raw["layer"] = {**raw["layer"], "wqkv": raw["layer"]["wqkv"] * 3, "wo": raw["layer"]["wo"] * 10}
    return ckpt.save(path, "falcon", c, raw, ckpt.target_info(params, cfg, "tiny"), d2t=d2t)


@pytest.mark.parametrize("mixing", [0.0, 0.5])
def test_examples_are_the_drafters_own_chain_with_the_draft_token(accept_tiny, tmp_path, mixing):
    """Example (depth d, node position p) = `state.out` at node d after `begin` and `expand` along
    a chain whose nodes 1..d-1 are the target's tokens and node d is the draft token y: a node's
    own pass at d = 2, 4 (it reads y), the anchor's inherited feature at d = 1, 3, 5; y = the
    parent's top-1 (T = 0) or a sample (T = 1), conf = q(y), labels from the target's own forward.
    With mixing, only the depths whose pass reads the node's token are mixed."""
    params, cfg, feats, exs = accept_tiny
    d, dp = ckpt.load(_save(accept_tiny, tmp_path / "d"), params, cfg)
    batch = Batches(features.FeatureSet.open(feats), np.arange(1), 1, 40, 0).make(np.asarray([3]))
    fn = functools.partial(accept_cache.EXAMPLES[type(d)], cfg=d.cfg, depths=5, temperatures=(0.0, 1.0),
                           mixing=mixing, tap_final=2)  # fmt: skip
    res = jax.jit(fn)(dp, batch=batch, target_head=ckpt.target_head(params), key=jax.random.PRNGKey(7))
    mixed = np.asarray(res["t0"]["mixed"][:, 0])
    assert not mixed[[0, 2, 4]].any()  # depths 1, 3, 5 read no token of their own
    assert mixed[[1, 3]].any() == (mixing > 0)
    if mixing:
        return
    toks = jnp.asarray(exs[3].tokens)[None]
    n = toks.shape[1]
    logits_t, taps = target_view(params, cfg, toks, d.taps)
    init = jax.jit(d.init, static_argnums=4, static_argnames="window")
    begin, expand = jax.jit(d.begin), jax.jit(d.expand)
    checked = 0
    for r in (n // 2, n // 2 + 1):  # roots of both parities inside the answer
        ctx = Context(tokens=jnp.zeros((1, 64), jnp.int32).at[:, :n].set(toks), lengths=jnp.asarray([r + 1]))
        state0 = init(dp, ctx, toks[:, :r], tuple(t[:, :r] for t in taps), 64, window=8)
        for depth in range(1, 6):
            j = r + depth - 1  # index of the node's position r + depth
            for key in ("t0", "t1"):
                e = {name: np.asarray(v[depth - 1, 0, j]) for name, v in res[key].items()}
                assert e["mask"], (key, depth, r)
                y = int(e["token"])
                tree = Tree.chain(toks[:, r : r + 6].at[:, depth].set(y))  # nodes 1..depth-1: the target's
                lg, state = begin(dp, state0, ctx)
                lg = lg[:, None]  # [B, 1, V] as `expand`'s for one frontier node
                for node in range(1, depth + 1):
                    parent_logits = lg[:, 0] if node == depth else None
                    lg, state = expand(dp, state, ctx, tree, jnp.asarray([[node]]))
                np.testing.assert_allclose(e["x"], state.out[0, depth], atol=5e-3, rtol=2e-3)
                assert_label_and_conf(e, key, parent_logits[0], logits_t[0, r + depth - 1])
                checked += 1
    assert checked == 2 * 5 * 2


def test_heads_per_depth_read_at_the_nodes_and_adaptive_chains_stay_lossless(accept_tiny, tmp_path):
    """Falcon's heads get one bias per example depth and its examples mix tokens (a parallel
    drafter's do not); `acceptance` after an expand = the head at `state.out` of the nodes with
    their depths and q; an adaptive chain on the heads decodes exactly the target's greedy tokens."""
    params, cfg, _, exs = accept_tiny
    src = _save(accept_tiny, tmp_path / "src")
    d, _ = ckpt.load(src, params, cfg)
    assert accept_cache.head_depths(d, 6) == 6 and accept_cache.token_mixing(d, 0.15) == 0.15
    hp = accept_head.init_params(jax.random.PRNGKey(0), cfg.hidden_size, confidence=True, depths=4)
    hp["depth_b"] = jnp.asarray([1.0, -1.0, 0.5, -2.0])
    entry = {"temperature": 0.0, "layers": 3, "weight_mismatch": 6.0, "threshold": 0.5, "confidence": True,
             "depths": 4}  # fmt: skip
    d, dp = ckpt.load(ckpt.with_accept_heads(src, tmp_path / "d", {"t0": (hp, entry)}), params, cfg)
    assert isinstance(d, falcon.Falcon) and d.accept_heads[0].depths == 4
    # the member after expanding three chain nodes
    b, r = 2, 12
    toks = jnp.stack([jnp.asarray(exs[i].tokens[:20]) for i in range(b)])
    _, taps, _ = forward(params, cfg, toks, jnp.broadcast_to(jnp.arange(20), (b, 20)), None,
                         causal_mask(b, 20), taps=d.taps)  # fmt: skip
    ctx = Context(tokens=jnp.zeros((b, 64), jnp.int32).at[:, :20].set(toks), lengths=jnp.full((b,), r + 1))
    state = d.init(dp, ctx, toks[:, :r], tuple(t[:, :r] for t in taps), 64, window=4)
    tree = Tree.chain(toks[:, r : r + 4])
    lg, state = d.begin(dp, state, ctx)
    lg = lg[:, None]
    qs = []
    for node in (1, 2, 3):
        qs.append(jax.nn.softmax(lg[:, 0], -1)[jnp.arange(b), toks[:, r + node]])
        lg, state = d.expand(dp, state, ctx, tree, jnp.full((b, 1), node))
    nodes = jnp.asarray([[1, 2, 3]] * b)
    got = d.acceptance(dp, state, ctx, tree, nodes, SamplingConfig())
    want = accept_head.prob(dp["accept"]["t0"], state.out[:, 1:4], d.accept_heads[0], jnp.stack(qs, 1),
                            jnp.asarray([1, 2, 3]))  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    no_bias = accept_head.prob({**dp["accept"]["t0"], "depth_b": jnp.zeros(4)}, state.out[:, 1:4],
                               d.accept_heads[0], jnp.stack(qs, 1), jnp.asarray([1, 2, 3]))  # fmt: skip
    assert bool(jnp.all((got > no_bias) == jnp.asarray([True, False, True])))
    prompts = [list(exs[i].tokens[:10]) for i in range(3)]
    c = cfg.replace(eos_token_ids=())
    ar = generate(params, c, prompts, max_new_tokens=12).tokens
    got = generate(params, c, prompts, max_new_tokens=12, drafter=d, draft_params=dp,
                   builder=parse_tree("chain:4+adaptive"), check=True)  # fmt: skip
    assert got.tokens == ar

"""Acceptance heads of parallel drafters (Medusa, Amphista, DFlash): the examples are what the
drafter computes in the loop, the contract member reads the drafting head's state with a per-depth
bias, the pipeline ships per-depth heads, and adaptive chains stay lossless with them."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import causal_mask
from specdec.context import Context
from specdec.drafters import accept_head, amphista, dflash, medusa
from specdec.drafters import checkpoint as ckpt
from specdec.drafters.protocol import by_node_depth
from specdec.generate import generate
from specdec.models import forward
from specdec.sampling import SamplingConfig
from specdec.train import accept_cache, acceptance, features
from specdec.train.trainer import Batches
from specdec.tree import Tree
from specdec.trees import parse_tree

from .accept_checks import assert_label_and_conf, target_view

VOCAB = 48  # draft vocabulary
FIRST = {"medusa": 0, "amphista": 0, "dflash": 1}  # logits / hidden index of depth 1


def _raw(kind: str, params, cfg, seed: int = 1):
    """(config, trained arrays without the target's shared ones, d2t) of a random drafter."""
    key = jax.random.PRNGKey(seed)
    d2t = np.sort(np.random.default_rng(seed).choice(cfg.vocab_size, VOCAB, replace=False)).astype(np.int32)
    if kind == "medusa":
        c = medusa.MedusaConfig.for_target(cfg, 3, VOCAB)
        p = medusa.init_params(c, key)
        p["w"] = jax.random.normal(key, p["w"].shape) * 0.3  # heads that differ from each other
    elif kind == "amphista":
        c = amphista.AmphistaConfig.for_target(cfg, 3, VOCAB)
        p = amphista.init_params(c, key)
        p["heads_w"] = jax.random.normal(key, p["heads_w"].shape) * 0.3
    else:
        c = dflash.DFlashConfig.for_target(
            cfg, num_layers=2, block_size=4, draft_vocab_size=VOCAB, taps=(1, 2)
        )
        p = dflash.init_params(c, key)
    return c, {k: v for k, v in p.items() if k not in ("embed", "head")}, d2t


def _save(kind, tiny, path):
    params, cfg, _, _ = tiny
    c, raw, d2t = _raw(kind, params, cfg)
    return ckpt.save(path, kind, c, raw, ckpt.target_info(params, cfg, "tiny"), d2t=d2t)


@pytest.mark.parametrize("kind", ["medusa", "amphista", "dflash"])
def test_examples_are_the_drafting_heads_in_the_loop(accept_tiny, tmp_path, kind):
    """Example (root r, depth d) = what the drafter holds after `begin` at root r (DFlash: every
    4th root): x = the state of
    the head that drafts depth d, y = its top-1 (T = 0) or a sample (T = 1), conf = q(y), label =
    1[y = target argmax] or min(1, p(y)/q(y)) with p from the target's own forward."""
    params, cfg, feats, exs = accept_tiny
    d, dp = ckpt.load(_save(kind, accept_tiny, tmp_path / "d"), params, cfg)
    batch = Batches(features.FeatureSet.open(feats), np.arange(1), 1, 40, 0).make(np.asarray([3]))
    fn = functools.partial(
        accept_cache.EXAMPLES[type(d)],
        cfg=d.cfg,
        depths=6,
        temperatures=(0.0, 1.0),
        mixing=0.15,
        tap_final=2,
    )  # as `build_examples` calls it
    res = jax.jit(fn)(dp, batch=batch, target_head=ckpt.target_head(params), key=jax.random.PRNGKey(7))
    k = d.max_depth
    assert res["t0"]["x"].shape[0] == k  # depths past the heads are not made
    assert not bool(jnp.any(res["t0"]["mixed"]))
    toks = jnp.asarray(exs[3].tokens)[None]
    n = toks.shape[1]
    logits_t, taps = target_view(params, cfg, toks, d.taps)
    init = jax.jit(d.init, static_argnums=4, static_argnames="window")
    checked = 0
    ran = [r for r in range(n // 2, n // 2 + 8) if kind != "dflash" or (r - 1) % 4 == 0]  # DFlash: every 4th
    for r in ran[:2]:  # roots inside the answer
        ctx = Context(tokens=jnp.zeros((1, 64), jnp.int32).at[:, :n].set(toks), lengths=jnp.asarray([r + 1]))
        state = init(dp, ctx, toks[:, :r], tuple(t[:, :r] for t in taps), 64, window=8)
        _, state = d.begin(dp, state, ctx)
        for depth in range(1, k + 1):
            i = FIRST[kind] + depth - 1
            for key in ("t0", "t1"):
                e = {name: np.asarray(v[depth - 1, 0, r - 1]) for name, v in res[key].items()}
                assert e["mask"], (key, depth, r)
                np.testing.assert_allclose(e["x"], state.hidden[0, i], atol=2e-2, rtol=2e-3)
                assert_label_and_conf(e, key, state.logits[0, i], logits_t[0, r + depth - 1])
                checked += 1
    assert checked == 2 * 2 * k
    # no root whose depth-k node is past the sequence; DFlash's roots between its anchors are not counted
    last = res["t0"]["mask"][k - 1, 0]
    assert not bool(jnp.any(last[n - 1 - k :]))
    if kind == "dflash":
        assert not bool(jnp.any(res["t0"]["mask"][:, 0, ran[0]]))  # root ran[0] + 1: no block there
    else:
        assert bool(last[n - 2 - k])


def test_acceptance_reads_the_drafting_head_with_its_depth_bias(accept_tiny, tmp_path):
    """`acceptance` of a parallel drafter: the head over the state of the head that drafted each node,
    plus the bias of the node's depth (and q(token) for a `confidence` head)."""
    params, cfg, _, exs = accept_tiny
    hp = accept_head.init_params(jax.random.PRNGKey(0), cfg.hidden_size, confidence=True, depths=3)
    hp["depth_b"] = jnp.asarray([2.0, -1.0, -3.0])
    entry = {"temperature": 0.0, "layers": 3, "weight_mismatch": 6.0, "threshold": 0.7, "confidence": True,
             "depths": 3}  # fmt: skip
    path = ckpt.with_accept_heads(
        _save("medusa", accept_tiny, tmp_path / "d"), tmp_path / "d", {"t0": (hp, entry)}
    )
    d, dp = ckpt.load(path, params, cfg)
    assert d.accept_heads[0].depths == 3 and d.threshold(SamplingConfig()) == 0.7
    b, r = 2, 12
    toks = jnp.stack([jnp.asarray(exs[i].tokens[:20]) for i in range(b)])
    pos = jnp.broadcast_to(jnp.arange(20), (b, 20))
    _, taps, _ = forward(params, cfg, toks, pos, None, causal_mask(b, 20), taps=d.taps)
    ctx = Context(tokens=jnp.zeros((b, 64), jnp.int32).at[:, :20].set(toks), lengths=jnp.full((b,), r + 1))
    state = d.init(dp, ctx, toks[:, :r], tuple(t[:, :r] for t in taps), 64, window=4)
    tree = Tree.chain(jnp.asarray([[toks[0, r], 5, 9, 11]] * b))
    nodes = jnp.asarray([[1, 2, 3]] * b)
    got = d.acceptance(dp, state, ctx, tree, nodes, SamplingConfig())
    spec = d.accept_heads[0]
    conf = jnp.stack([jax.nn.softmax(state.logits[:, j], -1)[:, t] for j, t in enumerate((5, 9, 11))], 1)
    want = accept_head.prob(dp["accept"]["t0"], state.hidden, spec, conf, jnp.asarray([1, 2, 3]))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(by_node_depth(state.hidden, tree, nodes), state.hidden)
    no_bias = accept_head.prob({**dp["accept"]["t0"], "depth_b": jnp.zeros(3)}, state.hidden, spec, conf,
                               jnp.asarray([1, 2, 3]))  # fmt: skip
    assert bool(jnp.all((got > no_bias) == jnp.asarray([True, False, False])))


def test_run_ships_per_depth_heads_and_adaptive_chains_stay_lossless(accept_tiny, tmp_path):
    """The pipeline on a Medusa drafter: heads with one bias per head, loaded with the drafter; an
    adaptive chain on them decodes exactly the target's greedy tokens."""
    params, cfg, feats, exs = accept_tiny
    src = _save("medusa", accept_tiny, tmp_path / "src")
    ac = acceptance.AcceptConfig(depths=6, steps=20, rows=64, warmup=2, heldout=6, valid=3, seq_batch=4,
                                 seq_len=40, eval_every=10, save_every=10)  # fmt: skip
    fs = features.FeatureSet.open(feats)
    out = acceptance.run(src, params, cfg, fs, tmp_path / "run", ac, progress=False, log=lambda s: None)
    meta = json.loads((tmp_path / "run" / "drafter" / "drafter.json").read_text())
    assert meta["accept"]["t0"]["depths"] == 3 and meta["accept"]["t1"]["depths"] == 3
    assert [x["depth"] for x in out["calibration"]["t0"]["per_depth"]] == [1, 2, 3]
    d, dp = ckpt.load(out["drafter"], params, cfg)
    assert [h.depths for h in d.accept_heads] == [3, 3]
    prompts = [list(exs[i].tokens[:10]) for i in range(3)]
    c = cfg.replace(eos_token_ids=())
    ar = generate(params, c, prompts, max_new_tokens=12).tokens
    builder = parse_tree("chain:3+adaptive:h=0.5")
    got = generate(
        params, c, prompts, max_new_tokens=12, drafter=d, draft_params=dp, builder=builder, check=True
    )
    assert got.tokens == ar

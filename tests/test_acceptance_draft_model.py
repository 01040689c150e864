"""Acceptance heads of a draft model (layer-skip): the examples are the state the drafter reaches at
a chain node after its draft token, read where `DraftModel.expand` leaves it; heads-only
checkpoints load with the target's layers; adaptive chains on the heads stay lossless."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.context import Context
from specdec.drafters import DraftModel, accept_head, layer_skip, parse_drafter
from specdec.drafters import checkpoint as ckpt
from specdec.generate import generate
from specdec.sampling import SamplingConfig
from specdec.train import accept_cache, features
from specdec.train.trainer import Batches
from specdec.tree import Tree
from specdec.trees import parse_tree

from .accept_checks import assert_label_and_conf, target_view


def test_examples_are_the_state_after_the_draft_token_at_every_depth(accept_tiny, tmp_path):
    """Example (position p) = `node_hidden` at node d after `begin` and `expand` along a chain whose
    nodes 1..d-1 are the target's tokens and node d is the draft token y, for d = 1, 2, 4 (the
    state does not depend on d); y = the parent's top-1 (T = 0) or a sample (T = 1), conf = q(y),
    labels from the target's own forward. Mixing drops its rows and nothing else."""
    params, cfg, feats, exs = accept_tiny
    d, dp = ckpt.load(ckpt.save_layer_skip(tmp_path / "ls", 1, params, cfg, "tiny"), params, cfg)
    assert isinstance(d, DraftModel) and accept_cache.example_depths(d, 6) == 1
    batch = Batches(features.FeatureSet.open(feats), np.arange(1), 1, 40, 0).make(np.asarray([3]))
    fn = functools.partial(accept_cache.EXAMPLES[type(d)], cfg=d.cfg, depths=6, temperatures=(0.0, 1.0),
                           tap_final=2)  # fmt: skip
    run = lambda mixing: jax.jit(functools.partial(fn, mixing=mixing))(  # noqa: E731
        dp, batch=batch, target_head=ckpt.target_head(params), key=jax.random.PRNGKey(7)
    )
    res, mixed_res = run(0.0), run(0.5)
    for key in ("t0", "t1"):
        assert res[key]["x"].shape[0] == 1  # one depth
        m = np.asarray(mixed_res[key]["mixed"])
        assert 0 < m.mean() < 1
        np.testing.assert_array_equal(mixed_res[key]["mask"], np.asarray(res[key]["mask"]) & ~m)
        np.testing.assert_array_equal(mixed_res[key]["token"], res[key]["token"])
    toks = jnp.asarray(exs[3].tokens)[None]
    n = toks.shape[1]
    logits_t, _ = target_view(params, cfg, toks, ())
    # the heads' state is kept only with heads: load the drafter with one
    hp = accept_head.init_params(jax.random.PRNGKey(0), cfg.hidden_size)
    entry = {"temperature": 0.0, "layers": 1, "weight_mismatch": 6.0, "threshold": None}
    dh, dhp = ckpt.load(
        ckpt.with_accept_heads(tmp_path / "ls", tmp_path / "h", {"t0": (hp, entry)}), params, cfg
    )
    init = jax.jit(dh.init, static_argnums=4, static_argnames="window")
    begin, expand = jax.jit(dh.begin), jax.jit(dh.expand)
    p = n // 2 + 4  # the node's position, inside the answer
    checked = 0
    for depth in (1, 2, 4):
        r = p - depth  # the root
        ctx = Context(tokens=jnp.zeros((1, 64), jnp.int32).at[:, :n].set(toks), lengths=jnp.asarray([r + 1]))
        state0 = init(dhp, ctx, toks[:, :r], (), 64, window=8)
        for key in ("t0", "t1"):
            e = {name: np.asarray(v[0, 0, p - 1]) for name, v in res[key].items()}
            assert e["mask"], (key, depth)
            tree = Tree.chain(toks[:, r : r + 6].at[:, depth].set(int(e["token"])))
            lg, state = begin(dhp, state0, ctx)
            lg = lg[:, None]
            for node in range(1, depth + 1):
                parent_logits = lg[:, 0]
                lg, state = expand(dhp, state, ctx, tree, jnp.asarray([[node]]))
            np.testing.assert_allclose(e["x"], state.node_hidden[0, depth], atol=5e-3, rtol=2e-3)
            assert_label_and_conf(e, key, parent_logits[0], logits_t[0, p - 1])
            checked += 1
    assert checked == 6


def test_heads_only_checkpoints_load_on_the_targets_layers(accept_tiny, tmp_path):
    """A layer-skip checkpoint stores no arrays of the drafter's own: it loads as `layer_skip` of
    the target (the same arrays), with heads the `acceptance` member reads `node_hidden` and q(y),
    and an adaptive chain on them decodes exactly the target's greedy tokens. Arrays of its own,
    an impossible K or another target are refused in one line; `layerskip:K` on a target without
    shipped heads has none."""
    params, cfg, _, exs = accept_tiny
    base = ckpt.save_layer_skip(tmp_path / "ls", 1, params, cfg, "tiny")
    d, dp = ckpt.load(base, params, cfg)
    want_d, want_p = layer_skip(params, cfg, 1)
    assert d == want_d and jax.tree.all(jax.tree.map(lambda a, b: a is b, dp, want_p))
    assert d.acceptance is None and parse_drafter("layerskip:1", params, cfg, max_depth=4)[0] == want_d
    hp = accept_head.init_params(jax.random.PRNGKey(0), cfg.hidden_size, confidence=True)
    entry = {"temperature": 0.0, "layers": 2, "weight_mismatch": 6.0, "threshold": 0.6, "confidence": True}
    d, dp = ckpt.load(ckpt.with_accept_heads(base, tmp_path / "h", {"t0": (hp, entry)}), params, cfg)
    assert d.threshold(SamplingConfig()) == 0.6 and ckpt.digest(tmp_path / "h") == ckpt.digest(base)
    b, r = 2, 12
    toks = jnp.stack([jnp.asarray(exs[i].tokens[:20]) for i in range(b)])
    ctx = Context(tokens=jnp.zeros((b, 64), jnp.int32).at[:, :20].set(toks), lengths=jnp.full((b,), r + 1))
    state = d.init(dp, ctx, toks[:, :r], (), 64, window=4)
    tree = Tree.chain(toks[:, r : r + 4])
    lg, state = d.begin(dp, state, ctx)
    qs = []
    for node in (1, 2, 3):
        qs.append(jax.nn.softmax(lg if node == 1 else lg[:, 0], -1)[jnp.arange(b), toks[:, r + node]])
        lg, state = d.expand(dp, state, ctx, tree, jnp.full((b, 1), node))
    got = d.acceptance(dp, state, ctx, tree, jnp.asarray([[1, 2, 3]] * b), SamplingConfig())
    want = accept_head.prob(
        dp["accept"]["t0"], state.node_hidden[:, 1:4], d.accept_heads[0], jnp.stack(qs, 1)
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    prompts = [list(exs[i].tokens[:10]) for i in range(3)]
    c = cfg.replace(eos_token_ids=())
    ar = generate(params, c, prompts, max_new_tokens=12).tokens
    for tree_spec in ("chain:4+adaptive", "dynamic:depth=3,topk=2,n=6+adaptive"):
        out = generate(params, c, prompts, max_new_tokens=12, drafter=d, draft_params=dp,
                       builder=parse_tree(tree_spec), check=True)  # fmt: skip
        assert out.tokens == ar, tree_spec
    meta = json.loads((base / "drafter.json").read_text())
    bad = [
        (dict(meta, config={"num_layers": 2}), "layer-skip needs 1 <= k < 2"),
        (dict(meta, target={**meta["target"], "fingerprint": [1.0] * 8}), "different weights"),
    ]
    for i, (m, msg) in enumerate(bad):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        (folder / "params.safetensors").write_bytes((base / "params.safetensors").read_bytes())
        (folder / "drafter.json").write_text(json.dumps(m))
        with pytest.raises(ckpt.DrafterCheckpointError, match=msg) as e:
            ckpt.load(folder, params, cfg)
        assert "\n" not in str(e.value)
    from safetensors.numpy import save_file

    save_file({"layers.w": np.zeros(2, np.float32)}, str(tmp_path / "h" / "params.safetensors"))
    with pytest.raises(ckpt.DrafterCheckpointError, match="only accept"):
        ckpt.read(tmp_path / "h")

"""SpecDec++ acceptance heads: labels, the weighted objective, token mixing, weight tying, training,
the EAGLE examples = the drafter's own chain, checkpoints with and without heads, the `acceptance`
contract member after an `expand`."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from specdec.cache import causal_mask
from specdec.checkpoints.common import DrafterCheckpointError
from specdec.context import Context
from specdec.drafter import option
from specdec.drafters import accept_head, eagle
from specdec.drafters import checkpoint as ckpt
from specdec.models import forward
from specdec.sampling import SamplingConfig
from specdec.train import accept_calibration, accept_examples, acceptance, features, losses
from specdec.train.trainer import Batches
from specdec.tree import Tree

from .accept_checks import assert_label_and_conf, target_view


@pytest.fixture(scope="module")
def tiny(accept_tiny):
    """(target params, cfg, feature set folder, examples): conftest's `accept_tiny`."""
    return accept_tiny


def _drafter(tiny, version=1, vocab=48, seed=1):
    """A random EAGLE drafter over a draft vocabulary of `vocab` ids:
    (config, raw params, runtime params, d2t)."""
    params, cfg, _, _ = tiny
    c = eagle.EagleConfig.for_target(cfg, version, vocab)
    d2t = np.sort(np.random.default_rng(seed).choice(cfg.vocab_size, vocab, replace=False)).astype(np.int32)
    raw = eagle.init_params(c, jax.random.PRNGKey(seed), np.asarray(ckpt.target_head(params))[:, d2t])
    raw = {k: v for k, v in raw.items()}
    return c, raw, ckpt.bind("eagle", c, {**raw, "d2t": d2t}, params), d2t


def _batch(tiny, seqs, seq_len=40):
    _, _, feats, _ = tiny
    return Batches(features.FeatureSet.open(feats), np.arange(len(seqs)), 1, seq_len, 0).make(
        np.asarray(seqs)
    )


# ------------------------------------------------------------------------------------------ labels
def test_labels_soft_at_t1_and_hard_at_t0():
    """On a toy pair: soft labels are min(1, p/q) per token, so their mean under q is Σ min(p, q)
    (speculative sampling's acceptance); hard labels are 1 exactly at the target's argmax."""
    p = jnp.asarray([0.5, 0.3, 0.15, 0.05])
    q = jnp.asarray([0.2, 0.6, 0.1, 0.1])
    y = jnp.arange(4)
    soft = losses.accept_label_soft(jnp.log(p[y]), jnp.log(q[y]))
    np.testing.assert_allclose(soft, [1.0, 0.5, 1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(q * soft), jnp.sum(jnp.minimum(p, q)), rtol=1e-6)
    hard = losses.accept_label_hard(y, jnp.argmax(p))
    np.testing.assert_array_equal(hard, [1.0, 0.0, 0.0, 0.0])


def test_weighted_loss_matches_the_formula_on_a_hand_example():
    """L = Σ[w(1-p)(-log σ0) + p(-log σ1)] / Σ[w(1-p) + p], masked positions left out."""
    lg = jnp.asarray([[0.0, 0.0], [1.0, -1.0], [-2.0, 2.0], [5.0, 5.0]])
    label = jnp.asarray([1.0, 0.25, 0.0, 0.7])
    mask = jnp.asarray([True, True, True, False])
    w = 6.0
    s1 = [0.5, 1 / (1 + math.exp(2)), 1 / (1 + math.exp(-4))]  # σ1 of the counted rows
    num = (0 + 1.0 * -math.log(s1[0])) + (w * 0.75 * -math.log(1 - s1[1]) + 0.25 * -math.log(s1[1]))
    num += w * 1.0 * -math.log(1 - s1[2])
    den = 1.0 + (w * 0.75 + 0.25) + w * 1.0
    np.testing.assert_allclose(losses.accept_loss(lg, label, mask, w), num / den, rtol=1e-5)
    # w = 1 and hard labels: the plain mean binary cross-entropy
    hard = jnp.asarray([1.0, 0.0, 1.0, 0.0])
    ref = np.mean([-math.log(0.5), -math.log(1 - s1[1]), -math.log(s1[2])])
    np.testing.assert_allclose(losses.accept_loss(lg, hard, mask, 1.0), ref, rtol=1e-5)


def test_head_is_one_weight_tied_block_and_prob_undoes_the_weight():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 8))
    p = accept_head.init_params(jax.random.PRNGKey(1), 8)
    assert sorted(p) == sorted(accept_head.PARAM_NAMES) and p["res_w"].shape == (8, 8)
    h = x
    for _ in range(3):
        h = h + jax.nn.silu(h @ p["res_w"] + p["res_b"])
    np.testing.assert_allclose(accept_head.logits(p, x, 3), h @ p["out_w"] + p["out_b"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(accept_head.logits(p, x, 1), accept_head.logits(p, x, 3))
    # prob: the weighted objective's minimiser σ = a / (a + w(1 - a)) maps back to a
    spec = accept_head.HeadSpec(temperature=0.0, layers=3, weight_mismatch=6.0)
    lg = accept_head.logits(p, x, 3)
    sigma = jax.nn.softmax(lg, -1)[:, 1]
    a = accept_head.prob(p, x, spec)
    np.testing.assert_allclose(sigma, a / (a + 6.0 * (1 - a)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(accept_head.raw_prob(p, x, 3), sigma, rtol=1e-5)


def test_pick_chooses_the_head_of_the_temperature():
    heads = (accept_head.HeadSpec(0.0), accept_head.HeadSpec(1.0, threshold=0.4), accept_head.HeadSpec(0.5))
    assert accept_head.pick(heads, SamplingConfig()).key == "t0"
    assert accept_head.pick(heads, SamplingConfig(temperature=0.9)).key == "t1"
    assert accept_head.pick(heads, SamplingConfig(temperature=0.6)).key == "t0.5"
    assert accept_head.pick(heads[:1], SamplingConfig(temperature=1.0)) is None
    assert accept_head.pick(heads[1:], SamplingConfig()) is None


# --------------------------------------------------------------------------------- EAGLE examples
@pytest.mark.parametrize("version", [1, 3])
def test_examples_are_the_drafters_own_chain_with_the_draft_token(tiny, version):
    """The example at depth d, position p = the drafter's `out` after expanding a chain whose first
    d - 1 nodes are the target's tokens and whose node d is the draft token y; at T = 0, y is the
    parent's top-1 and the label 1[y == target argmax]; at T = 1 the label is min(1, p(y)/q(y)) with
    p from the target's own forward and q from the drafter's logits."""
    params, cfg, _, exs = tiny
    c, _, dp, _ = _drafter(tiny, version)
    batch = _batch(tiny, [3])
    res = accept_examples.eagle_examples(
        dp,
        c,
        batch,
        ckpt.target_head(params),
        jax.random.PRNGKey(7),
        depths=3,
        temperatures=(0.0, 1.0),
        mixing=0.0,
        tap_final=2,
    )
    toks = jnp.asarray(exs[3].tokens)[None]
    n = toks.shape[1]
    logits_t, taps = target_view(params, cfg, toks, c.taps)
    d = eagle.Eagle(c)
    init = jax.jit(d.init, static_argnums=4, static_argnames="window")
    expand = jax.jit(d.expand)
    checked = 0
    for r in (n // 2, n // 2 + 3):  # root positions inside the answer
        ctx = Context(tokens=jnp.zeros((1, 64), jnp.int32).at[:, :n].set(toks), lengths=jnp.asarray([r + 1]))
        state0 = init(dp, ctx, toks[:, :r], tuple(t[:, :r] for t in taps), 64, window=4)
        for depth in (1, 2, 3):
            j = r + depth - 1  # index of the node's position r + depth
            for key in ("t0", "t1"):
                e = {k: np.asarray(v[depth - 1, 0, j]) for k, v in res[key].items()}
                assert e["mask"], (key, depth, r)
                y = int(e["token"])
                tree = Tree.chain(toks[:, r : r + 4].at[:, depth].set(y))  # nodes 1..depth-1: the target's
                parent_logits, state = d.begin(dp, state0, ctx)
                for k in range(1, depth + 1):
                    lg, state = expand(dp, state, ctx, tree, jnp.asarray([[k]]))
                    if k == depth - 1:
                        parent_logits = lg[:, 0]
                x = eagle.accept_input(dp, c, state.out[0, depth])
                np.testing.assert_allclose(e["x"], x, atol=2e-2, rtol=2e-3)
                assert_label_and_conf(e, key, parent_logits[0], logits_t[0, r + depth - 1])
                checked += 1
    assert checked == 12


def test_mixing_replaces_the_token_and_drops_those_positions(tiny):
    """Token mixing: the mixed positions take the target's token as input (their head input
    changes), are never counted, and the loss does not depend on their labels; the other positions
    are the unmixed examples."""
    params, _, _, _ = tiny
    c, _, dp, _ = _drafter(tiny)
    batch = _batch(tiny, [0, 1, 2, 3])
    kw = dict(depths=2, temperatures=(0.0,), tap_final=2)
    mixed = accept_examples.eagle_examples(
        dp, c, batch, ckpt.target_head(params), jax.random.PRNGKey(3), mixing=0.5, **kw
    )
    plain_ = accept_examples.eagle_examples(
        dp, c, batch, ckpt.target_head(params), jax.random.PRNGKey(3), mixing=0.0, **kw
    )
    m, p = mixed["t0"], plain_["t0"]
    mix, counted = np.asarray(m["mixed"]), np.asarray(p["mask"])
    assert 0.35 < mix[counted].mean() < 0.65
    np.testing.assert_array_equal(np.asarray(m["mask"]), counted & ~mix)
    keep = counted & ~mix
    np.testing.assert_array_equal(np.asarray(m["x"])[keep], np.asarray(p["x"])[keep])
    differs = counted & mix & (np.asarray(m["token"]) != np.asarray(batch.tokens)[None, :, 1:])
    assert differs.any()
    assert not np.allclose(np.asarray(m["x"])[differs], np.asarray(p["x"])[differs])
    lg = jax.random.normal(jax.random.PRNGKey(0), m["label"].shape + (2,))
    flipped = jnp.where(m["mixed"], 1.0 - m["label"], m["label"])
    np.testing.assert_allclose(
        losses.accept_loss(lg, m["label"], m["mask"]), losses.accept_loss(lg, flipped, m["mask"])
    )


# ------------------------------------------------------------------------------------------ training
def test_training_lowers_the_loss_and_beats_the_constant_on_held_out_rows(tmp_path):
    """Synthetic rows whose acceptance is a logistic function of the feature: the head's held-out
    BCE beats the base rate's, its weighted loss falls, and the de-biased prediction is calibrated."""
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=16) * 0.8

    def rows(n):
        x = rng.normal(size=(n, 16)).astype(np.float16)
        a = 1 / (1 + np.exp(-(x.astype(np.float64) @ w_true - 0.5)))
        return {
            "x": x,
            "label": a.astype(np.float32),
            "conf": np.full(n, 0.5, np.float32),
            "depth": rng.integers(1, 4, n).astype(np.int8),
            "seq": np.zeros(n, np.int32),
        }

    train, held = rows(6000), rows(2000)
    spec = accept_head.HeadSpec(temperature=1.0, layers=2, weight_mismatch=6.0)
    ac = acceptance.AcceptConfig(steps=300, rows=256, lr=3e-3, warmup=10, eval_every=300, save_every=150)
    params, hist = acceptance.train_head(
        train, held, spec, ac, tmp_path / "h", progress=False, log=lambda s: None
    )
    losses_ = [h["loss"] for h in hist if "loss" in h]
    assert np.mean(losses_[-3:]) < 0.8 * losses_[0], losses_
    pred = acceptance.predict(params, held, spec)
    raw = acceptance.predict(params, held, spec, raw=True)
    cal = accept_calibration.calibration(pred, raw, held, train, spec)
    assert cal["bce_head"] < cal["bce_constant"] - 0.05, cal
    assert cal["weighted_loss_head"] < cal["weighted_loss_constant"], cal
    assert cal["ece_head"] < 0.05 and cal["ece_head"] < cal["ece_head_raw"], cal
    # resuming a finished run restores it rather than retraining
    again, _ = acceptance.train_head(
        train, held, spec, ac, tmp_path / "h", progress=False, log=lambda s: None
    )
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_confidence_head_uses_the_draft_confidence(tmp_path):
    """Where acceptance depends on the draft's q(y), which the node's feature does not hold, a head
    with `confidence` beats the feature-only head, and its `conf_w` is learned from 1."""
    rng = np.random.default_rng(1)
    w_true = rng.normal(size=16) * 0.5

    def rows(n):
        x = rng.normal(size=(n, 16)).astype(np.float16)
        conf = rng.uniform(0.02, 0.98, n).astype(np.float32)
        z = x.astype(np.float64) @ w_true + 2.0 * np.log(conf / (1 - conf)) - 0.5
        return {"x": x, "label": (1 / (1 + np.exp(-z))).astype(np.float32), "conf": conf,
                "depth": np.ones(n, np.int8), "seq": np.zeros(n, np.int32)}  # fmt: skip

    train, held = rows(6000), rows(2000)
    ac = acceptance.AcceptConfig(steps=300, rows=256, lr=3e-3, warmup=10, eval_every=300, save_every=300)
    bces = {}
    for conf in (False, True):
        spec = accept_head.HeadSpec(temperature=1.0, layers=1, confidence=conf)
        params, _ = acceptance.train_head(train, held, spec, ac, tmp_path / str(conf), progress=False,
                                          log=lambda s: None)  # fmt: skip
        bces[conf] = accept_calibration.bce(acceptance.predict(params, held, spec), held["label"])
        assert ("conf_w" in params) == conf
    assert bces[True] < bces[False] - 0.02, bces
    assert abs(float(params["conf_w"]) - 1.0) > 0.1


# -------------------------------------------------------------------------------- checkpoint + hook
def _save(tiny, path, version=1):
    params, cfg, _, _ = tiny
    c, raw, _, d2t = _drafter(tiny, version)
    raw = {k: v for k, v in raw.items() if k not in ("embed", "head")}
    return ckpt.save(path, "eagle", c, raw, ckpt.target_info(params, cfg, "tiny"), d2t=d2t)


def test_checkpoint_round_trip_with_and_without_heads(tiny, tmp_path):
    params, cfg, _, _ = tiny
    plain_dir = _save(tiny, tmp_path / "plain")
    d0, dp0 = ckpt.load(plain_dir, params, cfg)
    assert d0.accept_heads == () and d0.acceptance is None and d0.threshold is None
    assert option(d0, "acceptance") is None and option(d0, "threshold") is None and "accept" not in dp0
    heads = {}
    for t in (0.0, 1.0):
        hp = accept_head.init_params(jax.random.PRNGKey(int(t) + 5), cfg.hidden_size)
        heads[accept_head.key_of(t)] = (
            hp,
            {
                "temperature": t,
                "layers": 2,
                "weight_mismatch": 6.0,
                "threshold": None,
                "training": {"command": "x"},
                "calibration": {"bce_head": 0.1},
            },
        )
    with_dir = ckpt.with_accept_heads(plain_dir, tmp_path / "with", heads)
    a, b = load_file(str(plain_dir / "params.safetensors")), load_file(str(with_dir / "params.safetensors"))
    assert set(b) - set(a) == {f"accept.{k}.{n}" for k in ("t0", "t1") for n in accept_head.PARAM_NAMES}
    for k in a:  # the drafter's own arrays are copied bit for bit
        np.testing.assert_array_equal(np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8))
    assert ckpt.digest(with_dir) == ckpt.digest(plain_dir) != ckpt.digest(_save(tiny, tmp_path / "v3", 3))
    d1, dp1 = ckpt.load(with_dir, params, cfg)
    assert [h.key for h in d1.accept_heads] == ["t0", "t1"] and d1.accept_heads[0].layers == 2
    assert callable(option(d1, "acceptance")) and d1.threshold(SamplingConfig()) is None
    hp = heads["t1"][0]
    np.testing.assert_allclose(dp1["accept"]["t1"]["res_w"], hp["res_w"], rtol=1e-2, atol=1e-3)  # bf16
    for x, y in zip(
        jax.tree.leaves(dp0), jax.tree.leaves({k: v for k, v in dp1.items() if k != "accept"}), strict=True
    ):
        np.testing.assert_array_equal(x, y)  # the drafter itself is unchanged
    # a threshold recorded later reaches the drafter; replacing one head keeps the other
    ckpt.record_threshold(with_dir, 1.0, 0.35, sweep="h in 0.1..0.9")
    d2, _ = ckpt.load(with_dir, params, cfg)
    assert d2.threshold(SamplingConfig(temperature=1.0)) == 0.35 and d2.threshold(SamplingConfig()) is None
    ckpt.with_accept_heads(with_dir, with_dir, {"t0": heads["t0"]})
    assert [h.key for h in ckpt.load(with_dir, params, cfg)[0].accept_heads] == ["t0", "t1"]
    # heads and their description must agree
    meta = json.loads((with_dir / "drafter.json").read_text())
    del meta["accept"]["t1"]
    (with_dir / "drafter.json").write_text(json.dumps(meta))
    with pytest.raises(DrafterCheckpointError, match="params hold"):
        ckpt.load(with_dir, params, cfg)


def test_acceptance_after_expand(tiny, tmp_path):
    """`acceptance` after `expand(frontier=nodes)`: [B, F] probabilities in [0, 1], the head for the
    sampling temperature over `state.out` at the nodes; without a head for that temperature, the
    draft's probability of the node's token."""
    params, cfg, _, exs = tiny
    heads = {
        "t0": (
            accept_head.init_params(jax.random.PRNGKey(0), cfg.hidden_size),
            {"temperature": 0.0, "layers": 3, "weight_mismatch": 6.0, "threshold": None},
        ),
        "t1": (  # a head that also reads q(token)
            accept_head.init_params(jax.random.PRNGKey(1), cfg.hidden_size, confidence=True),
            {"temperature": 1.0, "layers": 3, "weight_mismatch": 6.0, "threshold": None, "confidence": True},
        ),
    }
    path = ckpt.with_accept_heads(_save(tiny, tmp_path / "d"), tmp_path / "d", heads)
    d, dp = ckpt.load(path, params, cfg)
    b, r = 2, 12
    toks = jnp.stack([jnp.asarray(exs[i].tokens[:20]) for i in range(b)])
    _, taps, _ = forward(
        params, cfg, toks, jnp.broadcast_to(jnp.arange(20), (b, 20)), None, causal_mask(b, 20), taps=d.taps
    )
    ctx = Context(tokens=jnp.zeros((b, 64), jnp.int32).at[:, :20].set(toks), lengths=jnp.full((b,), r + 1))
    init = jax.jit(d.init, static_argnums=4, static_argnames="window")
    state = init(dp, ctx, toks[:, :r], tuple(t[:, :r] for t in taps), 64, window=4)
    tree = Tree(
        tokens=jnp.concatenate([toks[:, r : r + 1], jnp.asarray([[5, 9, 11]] * b)], axis=1),
        parents=jnp.asarray([[-1, 0, 0, 0]] * b),
        depth=jnp.asarray([[0, 1, 1, 1]] * b),
        valid=jnp.ones((b, 4), bool),
        max_depth=1,
    )
    nodes = jnp.asarray([[1, 2, 3]] * b)
    _, state = jax.jit(d.expand)(dp, state, ctx, tree, nodes)
    a0 = jax.jit(d.acceptance, static_argnums=5)(dp, state, ctx, tree, nodes, SamplingConfig())
    a1 = jax.jit(d.acceptance, static_argnums=5)(dp, state, ctx, tree, nodes, SamplingConfig(temperature=1.0))
    assert a0.shape == (b, 3) and a1.shape == (b, 3)
    assert bool(jnp.all((a0 >= 0) & (a0 <= 1))) and bool(jnp.all((a1 >= 0) & (a1 <= 1)))
    spec0 = d.accept_heads[0]
    want = accept_head.prob(dp["accept"]["t0"], state.out[:, 1:4], spec0)
    np.testing.assert_allclose(a0, want, rtol=1e-5)
    # the T = 1 head reads q(token) too: the parent's (the root's) draft distribution at the tokens
    q = jax.nn.softmax(d._logits(dp, state.out[:, 0]), -1)[:, jnp.asarray([5, 9, 11])]
    spec1 = d.accept_heads[1]
    assert spec1.confidence
    want1 = accept_head.prob(dp["accept"]["t1"], state.out[:, 1:4], spec1, q)
    np.testing.assert_allclose(a1, want1, rtol=1e-5)
    # a drafter with only the greedy head, sampling at T = 1: the draft's own q(token)
    only0 = dataclasses.replace(d, accept_heads=d.accept_heads[:1])
    s = SamplingConfig(temperature=1.0)
    got = jax.jit(only0.acceptance, static_argnums=5)(dp, state, ctx, tree, nodes, s)
    np.testing.assert_allclose(got, q, rtol=1e-5, atol=1e-7)
    assert only0.threshold(s) is None


def test_run_writes_a_loadable_drafter_with_heads_and_a_report(tiny, tmp_path):
    """The whole pipeline on the tiny set (plumbing: heads, calibration, report, plot, checkpoint);
    a rerun resumes from the cached examples and finished heads."""
    params, cfg, feats, _ = tiny
    src = _save(tiny, tmp_path / "src")
    fs = features.FeatureSet.open(feats)
    ac = acceptance.AcceptConfig(
        depths=2,
        steps=20,
        rows=64,
        warmup=2,
        heldout=6,
        valid=3,
        seq_batch=4,
        seq_len=40,
        eval_every=10,
        save_every=10,
    )
    out = acceptance.run(
        src, params, cfg, fs, tmp_path / "run", ac, command="cmd", progress=False, log=lambda s: None
    )
    d, dp = ckpt.load(out["drafter"], params, cfg)
    assert [h.key for h in d.accept_heads] == ["t0", "t1"] and d.accept_heads[0].weight_mismatch == 6.0
    meta = json.loads((tmp_path / "run" / "drafter" / "drafter.json").read_text())
    assert meta["accept"]["t0"]["threshold"] is None and meta["accept"]["t1"]["training"]["command"] == "cmd"
    assert meta["accept"]["t0"]["training"]["best_step"] in (10, 20)  # early stopping on validation
    for key in ("t0", "t1"):
        c = out["calibration"][key]
        assert c["rows"] > 0 and c["sequences"] == 3 and sum(b["rows"] for b in c["reliability"]) == c["rows"]
        assert [x["depth"] for x in c["per_depth"]] == [1, 2]
    assert (tmp_path / "run" / "reliability.png").stat().st_size > 0
    assert "BCE head" in (tmp_path / "run" / "report.md").read_text()
    logs = []
    acceptance.run(src, params, cfg, fs, tmp_path / "run", ac, command="cmd", progress=False, log=logs.append)
    assert any("resumed from step 20" in s for s in logs)


def test_accept_flags_need_accept_head_and_a_drafter():
    """specdec-train refuses the acceptance-head flags without --accept_head, --accept_head without a
    drafter, and duplicate temperatures, each as one line before anything loads."""
    from absl import app

    from specdec.cli.entry import parse_flags
    from specdec.train import cli

    cases = [
        (["--accept_depths", "3"], "--accept_depths apply to --accept_head"),
        (["--accept_head"], "--accept_head needs --drafter_checkpoint"),
        (["--accept_head", "--drafter_checkpoint", "eagle", "--accept_temperatures", "1,1.0"], "distinct"),
    ]
    try:
        for argv, msg in cases:
            parse_flags(cli.FLAGS, ["specdec-train", *argv])
            with pytest.raises(app.UsageError, match=msg) as e:
                cli.main([])
            assert "\n" not in str(e.value)
    finally:
        parse_flags(cli.FLAGS, ["specdec-train"])


def test_fine_tuning_a_drafter_with_heads_drops_them(tiny, tmp_path):
    """--init_from a checkpoint with acceptance heads: the drafter's arrays start the run, the heads
    (trained for the old weights) are not carried into the fine-tuned drafter."""
    from specdec.train import trainer

    params, cfg, feats, _ = tiny
    src = _save(tiny, tmp_path / "src")
    hp = accept_head.init_params(jax.random.PRNGKey(0), cfg.hidden_size)
    entry = {"temperature": 0.0, "layers": 1, "weight_mismatch": 6.0, "threshold": None}
    ckpt.with_accept_heads(src, src, {"t0": (hp, entry)})
    tc = trainer.TrainConfig(family="eagle", steps=2, batch_size=4, seq_len=40, warmup=1, heldout=4,
                             eval_every=100, save_every=100, lr=0.0, init_from=str(src))  # fmt: skip
    out = trainer.train(tc, params, cfg, "tiny", features.FeatureSet.open(feats), tmp_path / "run",
                        progress=False, log=lambda s: None)  # fmt: skip
    meta, p = ckpt.read(out["drafter"])
    assert "accept" not in meta and "accept" not in p
    np.testing.assert_array_equal(p["fc_w"], ckpt.read(src)[1]["fc_w"])

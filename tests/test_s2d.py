"""S2D: the exit chosen from confidences, exits at full depth reproduce the target, SoFT's loss is the
mean of its exits' losses, and decoding with any exit choice is lossless."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import KVCache, causal_mask
from specdec.drafters import layer_skip, s2d
from specdec.generate import generate
from specdec.matmul import dense
from specdec.models import ModelConfig, forward, to_device
from specdec.train.losses import Batch
from specdec.train.soft import exit_losses, soft_loss
from specdec.trees import parse_tree
from tests.sharded_worker import random_params

CFG = ModelConfig(arch="llama", vocab_size=97, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=256,
                  eos_token_ids=())  # fmt: skip


def test_exit_chosen_from_confidences():
    conf = jnp.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.5, 1.0], [0.7, 0.6, 0.0]])
    th = (0.7, 0.6)
    # per row: exit 0 (0.9 >= 0.7), exit 1 (0.8 >= 0.6), the last (none reach), exit 0 (0.7 >= 0.7)
    cases = {(1, 0, 0, 0): 0, (0, 1, 0, 0): 1, (1, 1, 0, 0): 1, (0, 0, 1, 0): 2, (1, 1, 1, 1): 2,
             (0, 0, 0, 1): 0, (0, 0, 0, 0): 0}  # fmt: skip
    for running, want in cases.items():
        assert int(s2d.choose_exit(conf, th, jnp.array(running, bool))) == want, running
    # the exits a drafter can reach: all, up to the first threshold of 0 (always taken), or a pinned one
    cfg = s2d.S2DConfig(exits=(1, 2, 3), thresholds=(0.7, 0.6))
    assert s2d.S2D(cfg).reach == 3 and s2d.S2D(cfg, thresholds=(0.7, 0.0)).reach == 2
    assert s2d.S2D(cfg, thresholds=(0.0, 0.0)).reach == 1 and s2d.S2D(cfg, exit=2).reach == 2


@pytest.fixture(scope="module")
def target():
    params = to_device(random_params(CFG, 0), CFG)
    return params


def _runtime(params, cfg: s2d.S2DConfig, host=None):
    """An S2D drafter's runtime params: the target's layers, embedding and head, and the exits'."""
    exits = host or s2d.init_params(cfg, np.asarray(params["final_norm"]))
    return {"layers": params["layers"], "embed": params["embed"], "head": params["lm_head"],
            **jax.tree.map(jnp.asarray, exits)}  # fmt: skip


def test_exits_at_full_depth_reproduce_the_target(target):
    params = target
    cfg = s2d.S2DConfig(exits=(1, 2, CFG.num_layers), thresholds=(0.5, 0.5), hidden_size=64, vocab_size=97)
    rt = _runtime(params, cfg)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 12)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    cache = KVCache.init(CFG, 2, 16)
    ref, _, _ = forward(params, CFG, toks, pos, cache, causal_mask(2, 12))
    _, hs, _ = forward(params, CFG, toks, pos, cache, causal_mask(2, 12), taps=cfg.exits, final=False)
    logits = [dense(s2d.exit_states(rt, i, h, CFG.rms_norm_eps), rt["head"]) for i, h in enumerate(hs)]
    np.testing.assert_allclose(logits[2], ref, atol=1e-5, rtol=1e-5)  # the last exit is the target
    # an untrained shallow exit is the layer-skip exit: the target's final norm and head on layer k
    skipper, sp = layer_skip(params, CFG, 2)
    skip, _, _ = forward(sp, skipper.cfg, toks, pos, KVCache.init(CFG, 2, 16), causal_mask(2, 12))
    np.testing.assert_allclose(logits[1], skip, atol=1e-5, rtol=1e-5)


def _batch(rng, cfg: s2d.S2DConfig, b=2, t=10, d=64):
    taps = {
        str(e): jnp.asarray(rng.normal(0, 1, (b, t, d)), jnp.float32) for e in (*cfg.exits, CFG.num_layers)
    }
    mask = jnp.asarray(rng.random((b, t)) < 0.7)
    top1 = jnp.asarray(rng.integers(0, 97, (b, t)), jnp.int32)
    return Batch(tokens=top1, loss_mask=mask, top1=top1, taps=taps)


def test_soft_loss_is_the_mean_of_the_exits_losses(target):
    rng = np.random.default_rng(1)
    cfg = s2d.S2DConfig(exits=(1, 2, 3), thresholds=(0.5, 0.5), hidden_size=64, vocab_size=97)
    host = s2d.init_params(cfg, np.ones(64))
    host["adapter"] = rng.normal(0, 0.1, host["adapter"].shape).astype(np.float32)
    host["conf_w"] = rng.normal(0, 0.1, host["conf_w"].shape).astype(np.float32)
    rt = _runtime(target, cfg, host) | {"target_head": target["lm_head"]}
    rt["target_head"] = jnp.asarray(rng.normal(0, 0.2, (64, 97)), jnp.float32)
    rt["head"] = jnp.asarray(rng.normal(0, 0.2, (64, 97)), jnp.float32)
    batch, t2d = _batch(rng, cfg), jnp.arange(97)
    kw = dict(eps=CFG.rms_norm_eps, tap_final=str(CFG.num_layers))
    loss, metrics = soft_loss(rt, cfg, batch, t2d, conf_weight=0.0, **kw)
    # each exit alone: its own one-exit config, its cross-entropy computed here by hand
    for i, e in enumerate(cfg.exits):
        one = {**rt, **{k: rt[k][i : i + 1] for k in ("norm", "adapter", "conf_w", "conf_b")}}
        alone = s2d.S2DConfig(exits=(e,), thresholds=(), hidden_size=64, vocab_size=97)
        ((ce, _, _),) = exit_losses(one, alone, batch, t2d, **kw)
        x = s2d.exit_states(rt, i, batch.taps[str(e)][:, :-1], CFG.rms_norm_eps)
        logq = jax.nn.log_softmax(x @ rt["head"], -1)
        p = jax.nn.softmax(batch.taps[str(CFG.num_layers)][:, :-1] @ rt["target_head"], -1)
        m = batch.loss_mask[:, 1:].astype(jnp.float32)
        hand = jnp.sum(-jnp.sum(p * logq, -1) * m) / jnp.sum(m)
        np.testing.assert_allclose(ce, hand, rtol=1e-5)
        np.testing.assert_allclose(metrics[f"ce_e{i}"], hand, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean([metrics[f"ce_e{i}"] for i in range(3)]), rtol=1e-6)
    with_conf, _ = soft_loss(rt, cfg, batch, t2d, conf_weight=0.5, **kw)
    bce = np.mean([metrics[f"bce_e{i}"] for i in range(3)])
    np.testing.assert_allclose(with_conf, loss + 0.5 * bce, rtol=1e-5)


# the confidence-chosen exit on a dynamic tree, a shallow and the full-depth exit pinned on a chain,
# the choice between the first two exits only (a threshold of 0: the deeper layers never run)
@pytest.mark.parametrize(
    "exit_,tree",
    [(None, "dynamic:depth=3,topk=3,n=10"), (1, "chain:3"), (4, "chain:3"), ("reach2", "chain:3")],
)
def test_greedy_decoding_is_lossless_at_any_exit(target, exit_, tree):
    params = target
    cfg = s2d.S2DConfig(exits=(1, 2, 4), thresholds=(0.5, 0.5), hidden_size=64, vocab_size=97)
    rng = np.random.default_rng(2)
    host = s2d.init_params(cfg, np.asarray(params["final_norm"]))
    host["conf_w"] = rng.normal(0, 1.0, host["conf_w"].shape).astype(np.float32)  # exits vary by step
    d = s2d.S2D(cfg, CFG, exit=exit_) if exit_ != "reach2" else s2d.S2D(cfg, CFG, thresholds=(0.5, 0.0))
    prompts = [[5, 9, 3, 5, 9, 3, 5, 9], [12, 13, 14, 12, 13], list(range(20, 45))]
    ar = generate(params, CFG, prompts, max_new_tokens=16).tokens
    dp = _runtime(params, cfg, host)
    out = generate(params, CFG, prompts, max_new_tokens=16, drafter=d, draft_params=dp,
                   builder=parse_tree(tree), check=True)  # fmt: skip
    assert out.tokens == ar
    if exit_ == 4:  # the full-depth exit drafts the target's own greedy tokens: every draft accepted
        assert out.accepted_hist[-1] > 0 and sum(out.accepted_hist[1:-1]) <= len(prompts)


def test_soft_training_learns_and_the_checkpoint_decodes_losslessly(tiny_cache, tmp_path):
    from specdec.drafters import checkpoint as ckpt
    from specdec.train import features, trainer

    params, cfg, path, _, folder = tiny_cache
    fs = features.FeatureSet.open(path)
    tc = trainer.TrainConfig(family="s2d", steps=60, batch_size=4, seq_len=40, lr=1e-2, warmup=5,
                             heldout=8, eval_every=60, save_every=60, draft_vocab=64,
                             options={"exits": "1"})  # fmt: skip
    quiet = dict(progress=False, log=lambda s: None)
    before = trainer.train(dataclasses.replace(tc, steps=1, eval_every=1), params, cfg, "tiny", fs,
                           tmp_path / "zero", **quiet)["heldout"]  # fmt: skip
    out = trainer.train(tc, params, cfg, "tiny", fs, tmp_path / "run", **quiet)
    ev = out["heldout"]
    assert ev["loss"] < before["loss"] and ev["acc_e0"] > before["acc_e0"] + 0.1, (before, ev)
    d, dp = ckpt.load(out["drafter"], params, cfg)
    assert isinstance(d, s2d.S2D) and d.target == cfg and d.cfg.exits == (1,)
    prompts = [[5, 9, 3, 5, 9, 3, 5, 9], [12, 13, 14, 12, 13]]
    ar = generate(params, cfg, prompts, max_new_tokens=12).tokens
    spec = generate(params, cfg, prompts, max_new_tokens=12, drafter=d, draft_params=dp,
                    builder=parse_tree("chain:3"), check=True)  # fmt: skip
    assert spec.tokens == ar
    # held-out statistics for its thresholds: per exit a confidence and a hit per answer position
    from specdec.train import s2d_thresholds as st

    conf, hit = st.exit_statistics(dp, d.cfg, fs, range(len(fs) - 8, len(fs)), eps=cfg.rms_norm_eps)
    assert conf.shape == hit.shape and conf.shape[1] == 1 and len(conf) > 20
    assert ((conf > 0) & (conf < 1)).all() and set(np.unique(hit)) <= {0.0, 1.0} and hit.mean() > 0.2
    costs, verify = st.pass_bytes(params, (1,))
    assert 0 < costs[0] < verify
    # a one-exit drafter has no threshold to choose; the record is kept beside the config
    res = st.calibrate(out["drafter"], params, cfg, fs, range(len(fs) - 8, len(fs)), depth=3)
    assert res["best"]["thresholds"] == [] and res["positions"] == len(conf)
    st.write_thresholds(out["drafter"], res["best"]["thresholds"], res)
    assert ckpt.load(out["drafter"], params, cfg)[0].cfg.thresholds == ()
    # a second target sharing the exit's layer (its last layer fine-tuned, as Medusa-2's): the drafter
    # fits it, and thresholds calibrated for it apply there only
    from specdec.loading import load_model

    assert ckpt.read(out["drafter"])[0]["target"]["backbone_layers"] == 1
    host = load_model(folder)
    layers = [dict(lp) for lp in host.params["layers"]]
    layers[-1]["w_down"] = layers[-1]["w_down"] * 1.1
    other = to_device({**host.params, "layers": layers}, cfg)
    st.write_thresholds(out["drafter"], [], res, target=("other", other, cfg))
    assert ckpt.load(out["drafter"], other, cfg)[0].thresholds == ()
    assert ckpt.load(out["drafter"], params, cfg)[0].thresholds is None  # (the config's)
    with pytest.raises(ValueError, match="below the target"):
        trainer.train(dataclasses.replace(tc, options={"exits": "1,2"}), params, cfg, "tiny", fs,
                      tmp_path / "bad", **quiet)  # fmt: skip


def test_thresholds_chosen_for_tokens_per_cost():
    from specdec.train import s2d_thresholds as st

    conf = np.array([[0.9, 0.0], [0.8, 0.0], [0.2, 0.0], [0.1, 0.0]])
    hit = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], float)
    assert st.route(conf, [0.5]).tolist() == [0, 0, 1, 1]
    best, pinned = st.choose(conf, hit, costs=[1.0, 3.0], verify_cost=10.0, depth=2)
    # confident positions draft cheaply at exit 0 (both accepted: 3 tokens for 10 + 2), the others
    # at exit 1 (3 tokens for 10 + 6): 12 tokens / 56; exit 0 alone: 4 x 1.75 / 48; exit 1 alone: 12 / 64
    assert best["tokens_per_cost"] == pytest.approx(12 / 56) and 0.2 < best["thresholds"][0] <= 0.8
    assert [p["tokens_per_cost"] for p in pinned] == pytest.approx([7 / 48, 12 / 64])
    assert best["share"] == [0.5, 0.5]

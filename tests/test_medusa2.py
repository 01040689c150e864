"""Medusa-2: the joint objective, training on a tiny target, the derived target it exports, and
lossless decoding against the fine-tuned backbone."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from specdec.checkpoints.derived import load_derived, save_derived
from specdec.drafters import medusa
from specdec.drafters.checkpoint import target_head
from specdec.drafters.family import TrainTarget
from specdec.drafters.medusa2 import Medusa2Config, backbone_params
from specdec.generate import generate
from specdec.loading import CheckpointError, load_model
from specdec.models import to_device
from specdec.train import losses
from specdec.train.medusa2 import _heads_at, backbone_states, medusa2_loss
from specdec.trees import parse_tree

QUIET = dict(progress=False, log=lambda s: None)


def _setup(params, cfg, seed=0, heads=2, k=1):
    vd = cfg.vocab_size
    mcfg = Medusa2Config(heads, cfg.hidden_size, vd, vd, k, cfg.num_layers)
    target = TrainTarget(cfg=cfg, params=params, d2t=None, head=None)
    p = {**medusa.init_params(mcfg.medusa, jax.random.PRNGKey(seed)), "backbone": backbone_params(target, k)}
    head = jnp.asarray(target_head(params), jnp.float32)
    return mcfg, p, {"head": head, "full_head": head}


def _batch(fs, seqs, t=40):
    from specdec.train.trainer import Batches

    return Batches(fs, np.asarray(seqs), len(seqs), t, 0).make(seqs)


def test_backbone_at_init_is_the_target_and_heads_loss_matches_medusa(tiny_cache):
    """Untrained, the copied last layer reproduces the target's final state (KL 0, agreement 1);
    over all positions the sampled-position heads loss is Medusa-1's `heads_loss`."""
    from specdec.train import features

    params, cfg, path, _, _ = tiny_cache
    fs = features.FeatureSet.open(path)
    batch = _batch(fs, [0, 1, 2, 3])
    mcfg, p, frozen = _setup(params, cfg)
    f = backbone_states(p["backbone"], cfg, jnp.asarray(batch.taps["1"], jnp.float32))
    m = batch.loss_mask[..., None]
    np.testing.assert_allclose(np.where(m, f, 0), np.where(m, batch.taps["2"], 0), atol=2e-3)
    loss, met = medusa2_loss({**p, **frozen}, mcfg, cfg, batch, jnp.arange(cfg.vocab_size), None,
                             steps=10, positions=0)  # fmt: skip
    assert float(met["kl"]) < 1e-5 and float(met["agree"]) > 0.97
    t = batch.tokens.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t - 1), (4, t - 1))
    logits = medusa.head_logits({**p, **frozen}, mcfg.medusa, f)
    got, gm = _heads_at(logits[:, : t - 1], idx, batch, jnp.arange(cfg.vocab_size))
    want, wm = losses.heads_loss(logits, batch, jnp.arange(cfg.vocab_size), None)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float(gm["acc1"]) == pytest.approx(float(wm["acc1"]), rel=1e-5)


def test_joint_objective_lowers_the_kl_and_the_heads_loss(tiny_cache):
    """From a perturbed backbone, steps on the joint loss pull it back to the original (KL falls)
    while the heads learn (their loss falls)."""
    from specdec.train import features

    params, cfg, path, _, _ = tiny_cache
    fs = features.FeatureSet.open(path)
    batch = _batch(fs, list(range(8)))
    mcfg, p, frozen = _setup(params, cfg)
    scale = jax.random.uniform(
        jax.random.PRNGKey(3), p["backbone"]["final_norm"].shape, minval=2.0, maxval=6.0
    )
    p["backbone"]["final_norm"] = p["backbone"]["final_norm"] * scale  # sharper, skewed: KL > 0
    t2d = jnp.arange(cfg.vocab_size)

    def f(q):
        return medusa2_loss(
            {**q, **frozen}, mcfg, cfg, batch, t2d, None, steps=1, heads_weight=0.05, positions=0
        )

    opt = optax.adam(3e-3)
    state = opt.init(p)
    step = jax.jit(lambda q, s: (lambda g: opt.update(g, s, q))(jax.grad(lambda q: f(q)[0])(q)))
    _, before = f(p)
    for _ in range(40):
        upd, state = step(p, state)
        p = optax.apply_updates(p, upd)
    _, after = f(p)
    assert float(before["kl"]) > 1e-2 and float(after["kl"]) < 0.5 * float(before["kl"]), (before, after)
    assert float(after["heads"]) < 0.7 * float(before["heads"]), (before, after)


def test_joint_training_exports_a_target_whose_heads_decode_losslessly(tiny_cache, tmp_path):
    from specdec.drafters import checkpoint as ckpt
    from specdec.train import features, trainer

    params, cfg, path, _, folder = tiny_cache
    fs = features.FeatureSet.open(path)
    stage1 = trainer.TrainConfig(family="medusa", steps=30, batch_size=4, seq_len=40, lr=1e-2, warmup=5,
                                 heldout=8, eval_every=30, save_every=30, draft_vocab=64,
                                 options={"heads": 2})  # fmt: skip
    s1 = trainer.train(stage1, params, cfg, folder, fs, tmp_path / "stage1", **QUIET)
    tc = trainer.TrainConfig(family="medusa2", steps=40, batch_size=4, seq_len=40, lr=1e-2, warmup=5,
                             heldout=8, eval_every=40, save_every=40, init_from=s1["drafter"],
                             options={"backbone_layers": 1, "heads": 2, "positions": 16})  # fmt: skip
    first = trainer.train(dataclasses.replace(tc, steps=1, eval_every=1), params, cfg, folder, fs,
                          tmp_path / "one", **QUIET)["heldout"]  # fmt: skip
    assert first["acc0"] > s1["heldout"]["acc0"] - 0.05  # stage 2 starts from stage 1's heads
    out = trainer.train(tc, params, cfg, folder, fs, tmp_path / "run", **QUIET)
    assert out["heldout"]["kl"] < 0.1 and out["heldout"]["acc0"] >= first["acc0"] - 0.05

    new = load_model(tmp_path / "run" / "target")
    base = load_model(folder)
    assert new.source == str(tmp_path / "run" / "target")
    np.testing.assert_array_equal(new.params["layers"][0]["wqkv"], base.params["layers"][0]["wqkv"])
    assert np.abs(new.params["layers"][1]["w_down"] - base.params["layers"][1]["w_down"]).max() > 1e-3
    meta = json.loads((tmp_path / "run" / "target" / "target.json").read_text())
    assert (
        meta["base"] == folder
        and "final_norm" in meta["replaced"]
        and "layers.0.wqkv" not in meta["replaced"]
    )

    nparams = to_device(new.params, new.cfg)
    d, dp = ckpt.load(out["drafter"], nparams, new.cfg)
    assert isinstance(d, medusa.Medusa) and d.cfg.num_heads == 2 and d.cfg.draft_vocab_size == 64
    with pytest.raises(ckpt.DrafterCheckpointError, match="other layers"):
        ckpt.load(out["drafter"], params, cfg)  # heads of the new backbone on the original: refused
    prompts = [[5, 9, 3, 5, 9, 3, 5, 9], [12, 13, 14, 12, 13]]
    ar = generate(nparams, new.cfg, prompts, max_new_tokens=12).tokens
    for tree in ("chain:2", "static:[(0,),(1,),(0,0),(1,0)]"):
        spec = generate(nparams, new.cfg, prompts, max_new_tokens=12, drafter=d, draft_params=dp,
                        builder=parse_tree(tree), check=True)  # fmt: skip
        assert spec.tokens == ar, tree


def test_derived_target_round_trip_and_refusals(tiny_cache, tmp_path):
    params, cfg, _, _, folder = tiny_cache
    base = load_model(folder)
    norm = np.asarray(base.params["final_norm"]) * 1.5
    save_derived(tmp_path / "d", folder, base.params, cfg, {"final_norm": norm})
    got = load_derived(tmp_path / "d")
    np.testing.assert_allclose(got.params["final_norm"], norm, rtol=1e-2)  # stored in bf16
    np.testing.assert_array_equal(got.params["embed"], base.params["embed"])
    with pytest.raises(ValueError, match="shape"):
        save_derived(tmp_path / "e", folder, base.params, cfg, {"final_norm": norm[:3]})
    # from device params (stacked layers, the CPU's packed layout), as a training run exports
    stacked = cfg.replace(scan_layers=True)
    w = np.asarray(base.params["layers"][1]["w_down"]) * 2.0
    save_derived(tmp_path / "s", folder, to_device(base.params, stacked), stacked, {"layers.1.w_down": w})
    np.testing.assert_allclose(load_model(tmp_path / "s").params["layers"][1]["w_down"], w, rtol=1e-2)
    meta = json.loads((tmp_path / "d" / "target.json").read_text())
    (tmp_path / "d" / "target.json").write_text(json.dumps({**meta, "base_fingerprint": [1.0] * 8}))
    with pytest.raises(CheckpointError, match="another model than its base"):
        load_derived(tmp_path / "d")

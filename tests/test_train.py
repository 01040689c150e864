"""Training: data salvage and masks, feature cache, losses that fall, exact resume, checkpoints,
training-time test = inference, data parallelism over 8 simulated devices."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import causal_mask
from specdec.drafters import checkpoint as ckpt
from specdec.drafters import eagle
from specdec.drafters.family import FAMILIES, option_fields
from specdec.drafters.protocol import Context
from specdec.models import forward
from specdec.train import data, features, losses, trainer
from specdec.tree import Tree

pytest.importorskip("torch")

CONVS = [
    {"id": "a", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]},
    {"id": "b", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a1"}, {"from": "human", "value": "dangling"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "only a question"}]},
]  # fmt: skip


def test_salvage_truncated_json(tmp_path):
    p = tmp_path / "sg.json"
    text = json.dumps(CONVS[:2])
    p.write_text(text[:-1] + ', {"id": "cut", "conversations": [{"from": "human", "va')
    with pytest.warns(UserWarning, match="truncated after record 2; salvaged the 2 complete"):
        convs = data.load_sharegpt(p)
    assert len(convs) == 2
    # b: the leading assistant turn and the trailing user turn are dropped
    assert [m["role"] for m in convs[1]] == ["user", "assistant"]


def test_jsonl_and_errors(tmp_path):
    p = tmp_path / "sg.jsonl"
    p.write_text("\n".join(json.dumps(c) for c in CONVS))
    assert len(data.load_sharegpt(p)) == 2  # c has no assistant turn
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_sharegpt(tmp_path / "missing.json")
    (tmp_path / "empty.jsonl").write_text(json.dumps(CONVS[2]) + "\n")
    with pytest.raises(data.DataError, match="no usable conversation"):
        data.load_sharegpt(tmp_path / "empty.jsonl")


def test_assistant_only_mask(embedded):
    tok = embedded.tokenizer
    conv = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]  # fmt: skip
    ex = data.tokenize_conversation(tok, conv, 512)
    starts = np.nonzero(np.diff(ex.loss_mask.astype(int), prepend=0) == 1)[0]
    ends = np.nonzero(np.diff(ex.loss_mask.astype(int), append=0) == -1)[0] + 1
    texts = [tok.decode(ex.tokens[a:b]) for a, b in zip(starts, ends, strict=True)]
    assert texts == ["Blue.<|im_end|>\n", "Green.<|im_end|>\n"]
    assert tok.decode(ex.tokens) == tok.apply_chat_template(conv, tokenize=False)
    assert data.tokenize_conversation(tok, conv, 8) is None  # truncated before any assistant token


# --------------------------------------------------------------------------------------------- tiny target
@pytest.fixture(scope="module")
def tiny(tiny_cache):
    return tiny_cache


def _regen_setup(tiny):
    from transformers import AutoTokenizer

    params, cfg, _, _, tiny_dir = tiny
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = (  # role words are unknown to the word-level vocabulary: they map to t0
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} t3 {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    rng = np.random.default_rng(1)
    safe = [i for i in range(3, cfg.vocab_size) if str(i)[0] not in "12"]  # "t1x" would split at eos t1
    words = lambda n: " ".join(f"t{i}" for i in rng.choice(safe, n))  # noqa: E731
    convs = [
        [user(words(3)), bot("t7"), user(words(2)), bot("t9")],
        [user(" ".join(["t14"] * 60)), bot("t15")],
    ]
    convs += [[user(words(int(rng.integers(2, 9)))), bot("t5")] * int(rng.integers(1, 4)) for _ in range(9)]
    return params, cfg, tok, convs, user, bot


def test_fused_regeneration_features_equal_extraction_and_resume(tiny, tmp_path):
    """Self-distillation in one pass: user turns kept, each assistant turn = the target's greedy
    continuation of the conversation so far; the features written from the generating forwards equal
    a separate extraction of the same tokens; a killed run resumes with nothing lost or repeated."""
    from specdec.generate import generate
    from specdec.train import regenerate as rg
    from specdec.train import regenerated_set as rs

    params, cfg, tok, convs, user, bot = _regen_setup(tiny)
    taps = (0, 1, 2)
    # eos t1 never wins on this random model often; t6 as an extra stop id exercises the "eos" end
    rc = rg.RegenConfig(max_len=48, max_new_tokens=5, slots=3, shard_size=2)
    stops = [cfg.eos_token_ids[0], 6]
    out = rg.regenerate(params, cfg, "tiny", tok, convs, tmp_path / "full", taps=taps, rc=rc,
                        eos_ids=stops, progress=False)  # fmt: skip
    fs = features.FeatureSet.open(out)
    regen = rs.conversations(out)
    assert len(fs) == len(regen) == len(convs) - 1  # conversation 1's prompt fills max_len

    def answer(ids):  # the target's greedy continuation of token ids, generated alone
        toks = generate(params, cfg, [ids], max_new_tokens=5, eos_ids=stops).tokens[0]
        return [t for t in toks if t not in stops]

    # Conversation 0 rebuilt by hand: prompt, answer, the template's tail (t3), the next user turn.
    u0, u1 = convs[0][0], convs[0][2]
    p0 = data._ids(tok, [u0], True)
    g0 = answer(p0)
    a0 = bot(tok.decode(g0))
    seq = p0 + g0 + [3] + data._ids(tok, [u0, a0, u1], True)[len(data._ids(tok, [u0, a0], False)) :]
    g1 = answer(seq)
    assert regen[0] == [u0, a0, u1, bot(tok.decode(g1))] and a0["content"] != "t7"
    np.testing.assert_array_equal(fs.seq(0, ["tokens"])["tokens"], seq + g1 + [3])
    for s in range(len(fs)):  # the cached features are those of a plain forward over the tokens
        d = fs.seq(s, ["tokens", "loss_mask", "top1", "tap_0", "tap_2"])
        n = len(d["tokens"])
        logits, hs, _ = forward(params, cfg, jnp.asarray(d["tokens"])[None], jnp.arange(n)[None], None,
                                causal_mask(1, n), taps=(0, 2))  # fmt: skip
        np.testing.assert_allclose(d["tap_0"], hs[0][0], atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(d["tap_2"], hs[1][0], atol=2e-3, rtol=2e-3)
        have = d["top1"] >= 0  # prompt positions that predict no answer token are not computed
        assert have[:-1][d["loss_mask"][1:]].all() and have[-1]
        assert (d["top1"][have] == np.argmax(logits[0], -1)[have]).mean() > 0.95
        # greedy: every answer token is the target's argmax after the previous one
        ans = np.flatnonzero(d["loss_mask"][1:] & (d["tokens"][1:] != 3)) + 1
        np.testing.assert_array_equal(d["tokens"][ans], d["top1"][ans - 1])

    # Killed after the first shard (conversations in flight lost), then resumed: the same data.
    part = tmp_path / "part"
    rg.regenerate(params, cfg, "tiny", tok, convs, part, taps=taps, rc=rc, eos_ids=stops, progress=False,
                  stop_after_shards=1)  # fmt: skip
    m = json.loads((part / "manifest.json").read_text())
    assert not m["complete"] and len(m["shards"]) == 1
    with pytest.raises(features.FeatureCacheError, match="interrupted"):
        features.FeatureSet.open(part)
    rg.regenerate(params, cfg, "tiny", tok, convs, part, taps=taps, rc=rc, eos_ids=stops, progress=False)
    fs2 = features.FeatureSet.open(part)
    assert rs.conversations(part) == regen and len(fs2) == len(fs)
    for s in range(len(fs)):
        a, b = fs.seq(s, ["tokens", "loss_mask", "tap_2"]), fs2.seq(s, ["tokens", "loss_mask", "tap_2"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
        # other batch neighbours and prefill paddings: the same up to float16 rounding
        np.testing.assert_allclose(a["tap_2"], b["tap_2"], atol=1e-3, rtol=1e-3)
    with pytest.raises(features.FeatureCacheError, match="other settings"):
        rg.regenerate(params, cfg, "tiny", tok, convs[1:], part, taps=taps, rc=rc, progress=False)

    # Exported text + ids rebuild the same features on a new machine without regenerating.
    exp = rs.export(out, tmp_path / "exported")
    (pname,) = rs.read(exp)["parts"]
    assert data.load_sharegpt(exp / pname / "conversations.jsonl.gz") == regen
    exs = rs.load_exported(exp)
    re = features.extract(params, cfg, "tiny", exs, tmp_path / "re", taps=taps, progress=False)
    fs3 = features.FeatureSet.open(re)
    for s in range(len(fs)):
        a, b = fs.seq(s, ["tokens", "loss_mask", "tap_1"]), fs3.seq(s, ["tokens", "loss_mask", "tap_1"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
        np.testing.assert_allclose(a["tap_1"], b["tap_1"], atol=2e-3, rtol=2e-3)

    # Spread over machines: a run killed after one shard left only its exported part (its feature
    # cache is lost with the machine); a new run on the same export regenerates only the rest, and
    # the two parts hold exactly the uninterrupted run's sequences.
    grown, m1, m2 = tmp_path / "grown", tmp_path / "m1", tmp_path / "m2"
    rg.regenerate(params, cfg, "tiny", tok, convs, m1, taps=taps, rc=rc, eos_ids=stops, progress=False,
                  on_shard=lambda: rs.export(m1, grown), stop_after_shards=1)  # fmt: skip
    first = rs.exported_indices(grown)
    assert 0 < len(first) < len(regen)
    rg.regenerate(params, cfg, "tiny", tok, convs, m2, taps=taps, rc=rc, eos_ids=stops, progress=False,
                  skip=first, on_shard=lambda: rs.export(m2, grown))  # fmt: skip
    assert len(features.FeatureSet.open(m2)) == len(regen) - len(first)
    assert len(rs.read(grown)["parts"]) == 2 and rs.read(grown)["total"]["sequences"] == len(regen)
    for a, b in zip(rs.load_exported(grown), exs, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    with pytest.raises(features.FeatureCacheError, match="other settings"):  # before any work
        m3, rc3 = tmp_path / "m3", dataclasses.replace(rc, max_new_tokens=4)
        rg.regenerate(params, cfg, "tiny", tok, convs, m3, taps=taps, rc=rc3, progress=False,
                      on_shard=lambda: rs.export(m3, grown))  # fmt: skip
    assert not list((tmp_path / "m3").glob("shard_*"))


# every family and every objective at least once (ce, tv, lk, DFlash's dpace weighting, HASS's align)
@pytest.mark.parametrize("family,own_heads,loss", [
    ("medusa", True, "ce"), ("eagle", False, "tv"), ("eagle3", False, "lk"), ("dflash", False, "dpace"),
    ("amphista", True, "lk"), ("falcon", False, "ce"), ("eagle", False, "align"),
])  # fmt: skip
def test_training_learns_and_checkpoint_loads(tiny, tmp_path, family, own_heads, loss):
    """Every family and loss (cross-entropy, total variation, the LK hybrid; DFlash's position decay
    and D-PACE weights) falls and beats chance."""
    params, cfg, path, _, _ = tiny
    fs = features.FeatureSet.open(path)
    weighting = "dpace" if loss == "dpace" else "decay"
    align = 2 if loss == "align" else 1  # EAGLE-1 with HASS context alignment
    loss = "ce" if loss in ("dpace", "align") else loss
    options = {"heads": 2, "ttt_steps": 2, "own_heads": own_heads, "dflash_layers": 1, "block_size": 4,
               "num_anchors": 8, "dflash_weighting": weighting, "align_steps": align}  # fmt: skip
    mine = option_fields(FAMILIES[family].options)  # each family takes its own options only
    tc = trainer.TrainConfig(family=family, steps=60, batch_size=4, seq_len=40, lr=1e-2, warmup=5,
                             heldout=8, eval_every=60, save_every=30, draft_vocab=64, loss=loss,
                             options={k: v for k, v in options.items() if k in mine})  # fmt: skip
    before = trainer.train(dataclasses_replace(tc, steps=1, eval_every=1), params, cfg, "tiny", fs,
                           tmp_path / "zero", progress=False, log=lambda s: None)["heldout"]  # fmt: skip
    out = trainer.train(tc, params, cfg, "tiny", fs, tmp_path / "run", progress=False, log=lambda s: None)
    ev = out["heldout"]
    assert ev["loss"] < before["loss"], (before, ev)
    assert ev["acc0"] > 3 / 64 and ev["acc0"] > before["acc0"] + 0.1, (before, ev)  # chance: 1/64
    if family == "falcon":  # per block slot: depth 1 (the whole block seen) beats depth 2
        assert ev["acc0"] > ev["acc1"], ev
    if family in ("eagle", "eagle3"):  # the expected acceptance at T = 1 rises too
        assert 0 < before["alpha0"] < ev["alpha0"] <= 1 and ev["tau_est_t1"] > 1 + ev["alpha0"] - 1e-6, ev
    d, dp = ckpt.load(out["drafter"], params, cfg)
    assert d.taps == (
        (2,) if family not in ("eagle3", "dflash") else d.cfg.taps
    )  # tap L = 2: the final state
    other = jax.tree.map(lambda x: x * 1.5, params)
    with pytest.raises(ckpt.DrafterCheckpointError, match="different weights"):
        ckpt.load(out["drafter"], other, cfg)
    with pytest.raises(ckpt.DrafterCheckpointError, match="vocab_size"):
        ckpt.load(out["drafter"], params, cfg.replace(vocab_size=cfg.vocab_size + 1))


def dataclasses_replace(tc, **kw):
    import dataclasses

    return dataclasses.replace(tc, **kw)


def test_interrupted_training_resumes_to_the_same_state(tiny, tmp_path):
    params, cfg, path, _, _ = tiny
    fs = features.FeatureSet.open(path)
    tc = trainer.TrainConfig(family="eagle", steps=12, batch_size=4, seq_len=40, warmup=2, heldout=8,
                             eval_every=100, save_every=4, draft_vocab=None)  # fmt: skip
    full = trainer.train(tc, params, cfg, "tiny", fs, tmp_path / "a", progress=False, log=lambda s: None)
    trainer.train(
        tc, params, cfg, "tiny", fs, tmp_path / "b", progress=False, stop_after=7, log=lambda s: None
    )
    logs = []
    resumed = trainer.train(tc, params, cfg, "tiny", fs, tmp_path / "b", progress=False, log=logs.append)
    assert any("resumed from step 4" in s for s in logs)  # saved every 4 steps; steps 5..7 redone
    _, pa = ckpt.read(full["drafter"])
    _, pb = ckpt.read(resumed["drafter"])
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)


def test_warm_start_keeps_the_checkpoint_and_refuses_another_drafter(tiny, tmp_path):
    """--init_from: the run starts from the checkpoint's params and draft vocabulary (at lr 0 the
    result is the checkpoint itself); another family or config is refused before training."""
    params, cfg, path, _, _ = tiny
    fs = features.FeatureSet.open(path)
    tc = trainer.TrainConfig(family="eagle", steps=6, batch_size=4, seq_len=40, warmup=2, heldout=8,
                             eval_every=100, save_every=100, draft_vocab=48)  # fmt: skip
    src = trainer.train(tc, params, cfg, "tiny", fs, tmp_path / "a", progress=False, log=lambda s: None)
    tb = dataclasses_replace(tc, steps=2, lr=0.0, draft_vocab=None, init_from=src["drafter"])
    out = trainer.train(tb, params, cfg, "tiny", fs, tmp_path / "b", progress=False, log=lambda s: None)
    _, pa = ckpt.read(src["drafter"])
    _, pb = ckpt.read(out["drafter"])
    assert len(pb["d2t"]) == 48
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)
    for fam, kw, needle in (("medusa", {}, "MedusaConfig"), ("eagle3", {}, "version 1 vs 3")):
        with pytest.raises(ckpt.DrafterCheckpointError, match=needle):
            trainer.train(dataclasses_replace(tb, family=fam, options=None, **kw), params, cfg, "tiny", fs,
                          tmp_path / fam, progress=False, log=lambda s: None)  # fmt: skip


@pytest.mark.parametrize("version", [1, 3])
def test_training_time_test_equals_inference_chain(tiny, version):
    """TTT step k's output at position p = the drafter's output at a depth-k chain node: EAGLE-3's
    training-time test, and EAGLE-1's HASS context alignment (`--align_steps`)."""
    params, cfg, _, exs, _ = tiny
    c = eagle.EagleConfig.for_target(cfg, version)
    dp = ckpt.bind("eagle", c, eagle.init_params(c, jax.random.PRNGKey(1)), params)
    toks = jnp.asarray(exs[3].tokens[:20])[None]
    n = toks.shape[1]
    _, taps, _ = forward(params, cfg, toks, jnp.arange(n)[None], None, causal_mask(1, n), taps=c.taps)
    outs = losses.eagle3_outputs(dp, c, toks, taps, ttt_steps=3)
    d = eagle.Eagle(c)
    r = 9  # root position: the prompt is toks[:r], the root toks[r]
    ctx = Context(tokens=jnp.zeros((1, 64), jnp.int32).at[:, :n].set(toks), lengths=jnp.asarray([r + 1]))
    state = d.init(dp, ctx, toks[:, :r], tuple(t[:, :r] for t in taps), 64, window=4)
    np.testing.assert_allclose(state.out[0, 0], outs[0][0, r - 1], atol=1e-4, rtol=1e-4)
    tree = Tree.chain(toks[:, r : r + 4])
    for k in (1, 2):
        _, state = d.expand(dp, state, ctx, tree, jnp.asarray([[k]]))
        np.testing.assert_allclose(state.out[0, k], outs[k][0, r + k - 1], atol=1e-4, rtol=1e-4)


def test_data_parallel_on_8_devices_matches_one(tiny, tmp_path):
    """Same losses on a ("data",) mesh of 8 simulated CPU devices as on one device."""
    _, _, path, _, tiny_dir = tiny
    script = textwrap.dedent(f"""
        import os, sys, json
        os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=" + sys.argv[1]
        import jax
        from specdec.loading import load_hf_folder
        from specdec.models import to_device
        from specdec.train import features, trainer
        m = load_hf_folder(sys.argv[2])
        p = to_device(m.params, m.cfg)
        fs = features.FeatureSet.open({str(path)!r})
        tc = trainer.TrainConfig(family="medusa", steps=3, batch_size=8, seq_len=40, warmup=1, heldout=8,
                                 eval_every=100, save_every=100, draft_vocab=None, options={{"heads": 2}})
        out = trainer.train(tc, p, m.cfg, "tiny", fs, sys.argv[3], progress=False, log=lambda s: None)
        print(json.dumps([len(jax.devices()), [h["loss"] for h in out["history"] if "loss" in h]]))
    """)
    res = []
    for ndev in (1, 8):
        r = subprocess.run(
            [sys.executable, "-c", script, str(ndev), tiny_dir, str(tmp_path / f"o{ndev}")],
            capture_output=True,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        assert r.returncode == 0, r.stderr[-3000:]
        res.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert res[0][0] == 1 and res[1][0] == 8
    np.testing.assert_allclose(res[0][1], res[1][1], rtol=1e-4)


def test_features_from_a_tensor_parallel_target_equal_one_device(tiny, tmp_path):
    """`--target_mesh`: the target sharded 4 ways (its 2 KV heads repeated) over 4 simulated CPU
    devices writes the same feature cache as one device (float16 storage tolerance)."""
    _, _, path, _, tiny_dir = tiny
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
        from specdec import sharding
        from specdec.loading import load_hf_folder
        from specdec.train import data, features
        m = load_hf_folder(sys.argv[1])
        params, cfg = sharding.device_params(m.params, m.cfg.replace(scan_layers=True),
                                             sharding.parse_mesh("model=4"))
        assert cfg.tp_groups == 4 and cfg.num_kv_heads == 4
        fs = features.FeatureSet.open({str(path)!r})
        exs = [data.Example(*(fs.seq(i, ["tokens", "loss_mask"])[k] for k in ("tokens", "loss_mask")))
               for i in range(len(fs))]
        features.extract(params, cfg, "tiny", exs, sys.argv[2], taps=(0, 1, 2), shard_size=16, progress=False)
    """)
    out = tmp_path / "tp_feats"
    r = subprocess.run([sys.executable, "-c", script, tiny_dir, str(out)], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    one, tp = features.FeatureSet.open(path), features.FeatureSet.open(out)
    assert len(tp) == len(one) == 40
    for i in (0, 17, 39):
        a, b = (
            one.seq(i, ["tokens", "top1", "tap_1", "tap_2"]),
            tp.seq(i, ["tokens", "top1", "tap_1", "tap_2"]),
        )
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        assert (a["top1"] == b["top1"]).mean() > 0.95
        for k in ("tap_1", "tap_2"):
            np.testing.assert_allclose(a[k], b[k], atol=2e-3, rtol=2e-3)

"""Training: data salvage and masks, feature cache, losses that fall, exact resume, checkpoints,
training-time test = inference, data parallelism over 8 simulated devices."""

from __future__ import annotations

import json
import os
import pathlib
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
from specdec.drafters.protocol import Context
from specdec.models import forward, to_device
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
def tiny(tiny_models, tmp_path_factory):
    """A tiny target and a feature cache of 40 random sequences (loss on the second half)."""
    _, loaded = tiny_models["llama"]
    cfg = loaded.cfg
    params = to_device(loaded.params, cfg)
    rng = np.random.default_rng(0)
    exs = []
    motifs = [rng.integers(3, cfg.vocab_size, k) for k in (3, 4, 5)]
    for _ in range(40):  # repeated motifs at random phases: a learnable, predictable future
        n = int(rng.integers(24, 40))
        motif = motifs[int(rng.integers(3))]
        toks = np.roll(np.resize(motif, n + len(motif)), -int(rng.integers(len(motif))))[:n].astype(np.int32)
        exs.append(data.Example(toks, np.arange(n) >= n // 3))
    path = tmp_path_factory.mktemp("feats")
    taps = (0, 1, 2)  # L = 2: EAGLE-3 taps (2, 1, 0) and the final state 2
    features.extract(params, cfg, "tiny", exs, path, taps=taps, shard_size=16, progress=False)
    src = pathlib.Path(loaded.source)
    return params, cfg, path, exs, str(src if src.is_dir() else src.parent)


def test_feature_cache_resumes_and_matches_forward(tiny, tmp_path):
    params, cfg, path, exs, _ = tiny
    fs = features.FeatureSet.open(path)
    assert len(fs) == 40 and fs.manifest["complete"]
    d = fs.seq(17, ["tokens", "top1", "tap_2"])
    n = len(exs[17].tokens)
    logits, taps, _ = forward(params, cfg, jnp.asarray(exs[17].tokens)[None], jnp.arange(n)[None], None,
                              causal_mask(1, n), taps=(2,))  # fmt: skip
    np.testing.assert_array_equal(d["tokens"], exs[17].tokens)
    np.testing.assert_allclose(d["tap_2"], taps[0][0], atol=2e-3, rtol=2e-3)  # float16 storage
    assert (d["top1"] == np.argmax(logits[0], -1)).mean() > 0.95
    # an interrupted extraction (manifest lists one shard of three) resumes and completes
    part = tmp_path / "part"
    features.extract(params, cfg, "tiny", exs[:16], part, taps=(2,), shard_size=16, progress=False)
    m = json.loads((part / "manifest.json").read_text())
    with pytest.raises(features.FeatureCacheError, match="different extraction"):
        features.extract(params, cfg, "tiny", exs, part, taps=(2,), shard_size=16, progress=False)
    m.update(num_examples=40, complete=False)
    (part / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(features.FeatureCacheError, match="interrupted"):
        features.FeatureSet.open(part)
    features.extract(params, cfg, "tiny", exs, part, taps=(2,), shard_size=16, progress=False)
    fs2 = features.FeatureSet.open(part)
    np.testing.assert_array_equal(fs2.seq(39, ["tokens"])["tokens"], exs[39].tokens)


def test_regenerate_rewrites_assistant_turns_and_resumes(tiny, tmp_path, monkeypatch):
    """Self-distillation: user turns kept, each assistant turn = the target's own continuation of the
    conversation so far; chunks land in a resumable JSONL that is valid ShareGPT data."""
    from transformers import AutoTokenizer

    from specdec import generate as gen_mod
    from specdec.train.regenerate import regenerate

    params, cfg, _, _, tiny_dir = tiny
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = (  # role words are unknown to the word-level vocabulary: they map to t0
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    convs = [
        [user("t5 t6"), bot("t7"), user("t8"), bot("t9")],
        [user("t10 t11 t12"), bot("t13")],
        [user(" ".join(["t14"] * 40)), bot("t15")],  # the prompt fills max_len
        [user("t20"), bot("t21")],
    ]

    def answer(messages):  # the target's greedy continuation, generated alone
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out = gen_mod.generate(params, cfg, [list(ids)], max_new_tokens=5, eos_ids=[])
        return tok.decode(out.tokens[0], skip_special_tokens=True).strip()

    a1 = answer(convs[0][:1])
    want0 = [convs[0][0], bot(a1), convs[0][2]]
    want0.append(bot(answer(want0)))
    want1 = [convs[1][0], bot(answer(convs[1][:1]))]

    path = tmp_path / "regen.jsonl"
    kw = dict(max_len=30, max_new_tokens=5, batch_size=2, eos_ids=[], progress=False)
    got = regenerate(params, cfg, tok, convs, path, **kw)
    assert got[0] == want0 and got[1] == want1 and len(got) == 3  # conversation 2 had no room
    assert len(a1.split()) == 5 and a1 != "t7"
    assert data.load_sharegpt(path) == got  # the JSONL is ShareGPT data

    # Interrupted after the first chunk, mid-way through writing the second: only the rest is redone.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:15])
    calls = []
    real = gen_mod.generate
    monkeypatch.setattr(gen_mod, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    assert regenerate(params, cfg, tok, convs, path, **kw) == got
    assert calls == [1]  # the second chunk only: conversation 3 (conversation 2 has no room to ask)
    with pytest.raises(ValueError, match="regenerations of other conversations"):
        regenerate(params, cfg, tok, convs[1:], path, **kw)


@pytest.mark.parametrize("family,own_heads", [("medusa", True), ("medusa", False), ("eagle", False),
                                             ("eagle3", False)])  # fmt: skip
def test_training_learns_and_checkpoint_loads(tiny, tmp_path, family, own_heads):
    params, cfg, path, _, _ = tiny
    fs = features.FeatureSet.open(path)
    tc = trainer.TrainConfig(family=family, steps=60, batch_size=4, seq_len=40, lr=1e-2, warmup=5,
                             heldout=8, eval_every=60, save_every=30, draft_vocab=64, heads=2, ttt_steps=2,
                             own_heads=own_heads)  # fmt: skip
    before = trainer.train(dataclasses_replace(tc, steps=1, eval_every=1), params, cfg, "tiny", fs,
                           tmp_path / "zero", progress=False, log=lambda s: None)["heldout"]  # fmt: skip
    out = trainer.train(tc, params, cfg, "tiny", fs, tmp_path / "run", progress=False, log=lambda s: None)
    ev = out["heldout"]
    assert ev["loss"] < before["loss"], (before, ev)
    assert ev["acc0"] > 3 / 64 and ev["acc0"] > before["acc0"] + 0.1, (before, ev)  # chance: 1/64
    d, dp = ckpt.load(out["drafter"], params, cfg, window=16)
    assert d.taps == ((2,) if family != "eagle3" else d.cfg.taps)
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


def test_training_time_test_equals_inference_chain(tiny):
    """TTT step k's output at position p = the EAGLE-3 drafter's output at a depth-k chain node."""
    params, cfg, _, exs, _ = tiny
    c = eagle.EagleConfig.for_target(cfg, 3)
    dp = ckpt.bind("eagle", c, eagle.init_params(c, jax.random.PRNGKey(1)), params)
    toks = jnp.asarray(exs[3].tokens[:20])[None]
    n = toks.shape[1]
    _, taps, _ = forward(params, cfg, toks, jnp.arange(n)[None], None, causal_mask(1, n), taps=c.taps)
    outs = losses.eagle3_outputs(dp, c, toks, taps, ttt_steps=3)
    d = eagle.Eagle(c, window=4)
    r = 9  # root position: the prompt is toks[:r], the root toks[r]
    ctx = Context(tokens=jnp.zeros((1, 64), jnp.int32).at[:, :n].set(toks), lengths=jnp.asarray([r + 1]))
    state = d.init(dp, ctx, toks[:, :r], tuple(t[:, :r] for t in taps), 64)
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
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[1]
        import jax
        from specdec.loading import load_hf_folder
        from specdec.models import to_device
        from specdec.train import features, trainer
        m = load_hf_folder(sys.argv[2])
        p = to_device(m.params, m.cfg)
        fs = features.FeatureSet.open({str(path)!r})
        tc = trainer.TrainConfig(family="medusa", steps=3, batch_size=8, seq_len=40, warmup=1, heldout=8,
                                 eval_every=100, save_every=100, draft_vocab=None, heads=2)
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

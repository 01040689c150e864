"""Importing official Medusa / EAGLE-1 / EAGLE-3 checkpoints (`specdec.drafters.official`).

The checkpoints are synthetic (`tests/official_ref.py`). Numerics are checked against a small
independent torch re-implementation of the official forwards, then the imported drafters run in the
decode loop, where greedy output must equal plain decoding. DFlash: tests/test_official_dflash.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from specdec.cache import causal_mask  # noqa: E402
from specdec.drafters import eagle, medusa  # noqa: E402
from specdec.drafters.checkpoint import DrafterCheckpointError  # noqa: E402
from specdec.drafters.official import is_official, load_official, read_tensors  # noqa: E402
from specdec.generate import generate  # noqa: E402
from specdec.matmul import plain  # noqa: E402
from specdec.models import to_device  # noqa: E402
from specdec.trees import parse_tree  # noqa: E402
from tests.official_ref import (  # noqa: E402
    DH,
    NH,
    PROMPTS,
    H,
    assert_close,
    eagle1_sd,
    eagle3_sd,
    inputs,
    j,
    llama_config,
    medusa_sd,
    ours,
    save,
    t_eagle1,
    t_eagle3,
    t_medusa,
)  # fmt: skip


@pytest.fixture(scope="module")
def target(tiny_models):
    _, loaded = tiny_models["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    return to_device(loaded.params, cfg), cfg


# ------------------------------------------------------------------------------------------------------------
# Round-trip numerics


@pytest.mark.parametrize("fmt", ["pytorch_model.bin", "model.safetensors"])
@pytest.mark.parametrize("bias", [True, False])
def test_eagle1_numerics(target, tmp_path, fmt, bias):
    params, cfg = target
    sd = eagle1_sd(bias=bias)
    folder = save(tmp_path / "e1", sd, fmt, llama_config(**({} if bias else {"bias": False})))
    assert is_official(folder) == "eagle"
    d, dp = load_official(folder, params, cfg)
    assert d.cfg.version == 1 and d.cfg.taps == (cfg.num_layers,) and d.cfg.fc_bias == bias
    tokens, (feat,), pos = inputs(cfg.vocab_size)
    emb = torch.from_numpy(np.array(params["embed"]))[tokens]
    head = torch.from_numpy(np.array(plain(params["lm_head"])))
    assert_close(ours(d, dp, tokens, [feat], pos), t_eagle1(sd, emb, feat, pos, head))


@pytest.mark.parametrize(
    "fmt,naming,reduced,embed",
    [
        ("pytorch_model.bin", "midlayer", True, False),
        ("model.safetensors", "layers.0", True, True),
        ("model.safetensors", "midlayer", False, False),
        ("pytorch_model.bin", "layers.0", False, False),
    ],
)
def test_eagle3_numerics(target, tmp_path, fmt, naming, reduced, embed):
    params, cfg = target
    ids = np.sort(np.random.default_rng(0).choice(cfg.vocab_size, 40, replace=False)) if reduced else None
    sd = eagle3_sd(draft_ids=ids, naming=naming, embed=embed)  # speculators files may carry an embedding
    extra = {"draft_vocab_size": 40 if reduced else cfg.vocab_size}
    folder = save(tmp_path / "e3", sd, fmt, llama_config(**extra))
    d, dp = load_official(folder, params, cfg)
    assert d.cfg.version == 3 and d.cfg.draft_vocab_size == extra["draft_vocab_size"]
    L = cfg.num_layers
    assert d.cfg.taps == tuple(min(max(i, 0), L) for i in (2, L // 2, L - 3))
    if reduced:
        np.testing.assert_array_equal(np.asarray(dp["d2t"]), ids)  # offsets -> absolute target ids
    else:
        assert "d2t" not in dp  # no d2t/t2d with the full vocabulary: the identity
    tokens, feats, pos = inputs(cfg.vocab_size, widths=(H, H, H))
    emb = torch.from_numpy(np.array(params["embed"]))[tokens]  # the target's, not the file's
    assert_close(ours(d, dp, tokens, feats, pos), t_eagle3(sd, emb, *feats, pos, naming + "."))


def test_eagle3_own_embedding_when_narrower(target, tmp_path):
    """target_hidden_size != hidden_size: the draft normalises its own (width-H) embedding."""
    params, cfg = target
    sd = eagle3_sd(d=H, dt=32, embed=True)  # a target of width 32 is emulated by the taps' width
    cfg32 = cfg.replace(hidden_size=32)
    folder = save(tmp_path / "e3", sd, "model.safetensors", llama_config(target_hidden_size=32))
    d, dp = load_official(folder, params, cfg32)
    tokens, feats, pos = inputs(cfg.vocab_size, widths=(32, 32, 32))
    emb = sd["embed_tokens.weight"][tokens]
    assert_close(ours(d, dp, tokens, feats, pos), t_eagle3(sd, emb, *feats, pos))


@pytest.mark.parametrize(
    "own,fmt,prefix", [(True, "medusa_lm_head.pt", ""), (False, "medusa_lm_head.safetensors", "medusa_head.")]
)
def test_medusa_numerics(target, tmp_path, own, fmt, prefix):
    params, cfg = target
    sd = medusa_sd(3, H, cfg.vocab_size, own=own, prefix=prefix)
    if fmt.endswith(".pt"):  # the official .pt is bf16
        sd = {k: v.bfloat16() for k, v in sd.items()}
    folder = save(
        tmp_path / "m",
        sd,
        fmt,
        {"medusa_num_heads": 3, "medusa_num_layers": 1, **({} if own else {"version": "2"})},
    )
    assert is_official(folder) == "medusa"
    d, dp = load_official(folder, params, cfg)
    assert (d.cfg.num_heads, d.cfg.own_heads, d.cfg.tap) == (3, own, cfg.num_layers)
    sd = {k[len(prefix) :]: v.float() for k, v in sd.items()}
    feat = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(3))
    got = np.asarray(medusa.head_logits(dp, d.cfg, j(feat)))  # [2, 5, K, V]
    head = None if own else torch.from_numpy(np.array(plain(params["lm_head"])))
    for k in range(3):
        assert_close(got[..., k, :], t_medusa(sd, feat, k, head))


# ------------------------------------------------------------------------------------------------------------
# Formats and traps


def test_medusa_five_heads_config_says_two(target, tmp_path):
    params, cfg = target
    folder = save(
        tmp_path / "m",
        medusa_sd(5, H, cfg.vocab_size),
        "medusa_lm_head.safetensors",
        {"base_model_name_or_path": "lmsys/vicuna-7b-v1.3", "medusa_num_heads": 2, "medusa_num_layers": 1},
    )
    with pytest.warns(UserWarning, match="medusa_num_heads=2.*5 heads"):
        d, dp = load_official(folder, params, cfg)
    assert d.cfg.num_heads == 5 and dp["w"].shape == (5, H, H) and dp["heads"].shape == (5, H, cfg.vocab_size)


def test_medusa_refusals(target, tmp_path):
    params, cfg = target
    two_layers = save(
        tmp_path / "n2",
        medusa_sd(2, H, cfg.vocab_size),
        "medusa_lm_head.safetensors",
        {"medusa_num_heads": 2, "medusa_num_layers": 2},
    )
    with pytest.raises(DrafterCheckpointError, match="medusa_num_layers=2.*one ResBlock per head"):
        load_official(two_layers, params, cfg)
    full = medusa_sd(2, H, cfg.vocab_size, prefix="medusa_head.")
    full["model.embed_tokens.weight"] = torch.zeros(cfg.vocab_size, H)
    folder = save(
        tmp_path / "full", full, "model.safetensors", {"medusa_num_heads": 2, "model_type": "llama"}
    )
    assert is_official(folder) == "medusa"
    with pytest.raises(DrafterCheckpointError, match="full Medusa-2 model"):
        load_official(folder, params, cfg)


def test_d2t_offsets_and_checks(target, tmp_path):
    params, cfg = target
    ids = np.array([0, 3, 4, 10, 96])
    folder = save(
        tmp_path / "ok", eagle3_sd(draft_ids=ids), "model.safetensors", llama_config(draft_vocab_size=5)
    )
    d, dp = load_official(folder, params, cfg)
    np.testing.assert_array_equal(np.asarray(dp["d2t"]), ids)
    assert dp["head"].shape == (H, 5)
    tokens, feats, pos = inputs(cfg.vocab_size, widths=(H, H, H))
    c = d.cfg
    out, _ = eagle.run_layer(
        dp,
        c,
        j(tokens),
        eagle.fuse(dp, c, tuple(j(f) for f in feats)),
        j(pos),
        None,
        causal_mask(*tokens.shape),
    )
    full = np.asarray(d._logits(dp, out))  # over the target vocabulary: -inf-like off the draft ids
    assert (
        full.shape[-1] == cfg.vocab_size
        and (full[..., np.setdiff1d(np.arange(cfg.vocab_size), ids)] < -1e29).all()
    )
    sd = eagle3_sd(draft_ids=ids)
    del sd["d2t"], sd["t2d"]
    missing = save(tmp_path / "missing", sd, "model.safetensors", llama_config(draft_vocab_size=5))
    with pytest.raises(DrafterCheckpointError, match="no d2t"):
        load_official(missing, params, cfg)
    sd = eagle3_sd(draft_ids=ids)
    sd["d2t"][-1] = 200  # draft id 4 -> target id 204, outside the vocabulary
    bad = save(tmp_path / "bad", sd, "model.safetensors", llama_config(draft_vocab_size=5))
    with pytest.raises(DrafterCheckpointError, match="d2t maps draft ids outside"):
        load_official(bad, params, cfg)


def test_tap_layer_ids(tiny_models, tmp_path):
    _, loaded = tiny_models["llama"]
    cfg = loaded.cfg.replace(num_layers=8)  # only the tap arithmetic is exercised here
    params = to_device(loaded.params, loaded.cfg)
    sd = eagle3_sd()
    plain = save(tmp_path / "plain", sd, "model.safetensors", llama_config())
    assert load_official(plain, params, cfg)[0].cfg.taps == (2, 4, 5)
    sglang = save(
        tmp_path / "sg",
        sd,
        "model.safetensors",
        llama_config(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 4]}),
    )
    assert load_official(sglang, params, cfg)[0].cfg.taps == (2, 4, 5)  # "output of layer k" = tap k + 1
    vllm = save(
        tmp_path / "vl", sd, "model.safetensors", llama_config(eagle_aux_hidden_state_layer_ids=[2, 4, 5])
    )
    assert load_official(vllm, params, cfg)[0].cfg.taps == (2, 4, 5)
    wrong = save(
        tmp_path / "wr", sd, "model.safetensors", llama_config(eagle_aux_hidden_state_layer_ids=[2, 4, 9])
    )
    with pytest.raises(DrafterCheckpointError, match="taps"):
        load_official(wrong, params, cfg)


def test_torch_reader_dtypes_and_views(tmp_path):
    sd = {
        "bf": torch.randn(3, 4).bfloat16(),
        "t": torch.randn(4, 3).t(),
        "i": torch.arange(5),
        "b": torch.tensor([True, False]),
        "s": torch.tensor(2.5),
        "slice": torch.arange(12.0).view(3, 4)[1:],
    }
    torch.save(sd, tmp_path / "x.bin")
    t = read_tensors(tmp_path / "x.bin")
    for k, v in sd.items():
        np.testing.assert_array_equal(np.asarray(t.get(k), np.float64), v.double().numpy())
        assert t.shapes[k] == tuple(v.shape)


def test_not_official(tmp_path, tiny_models):
    assert is_official(tmp_path) is None
    hf = save(
        tmp_path / "hf", {"model.embed_tokens.weight": torch.zeros(3, 2)}, "model.safetensors", llama_config()
    )
    assert is_official(hf) is None  # a regular one-layer HF model is not an EAGLE head
    with pytest.raises(DrafterCheckpointError, match="not an official Medusa or EAGLE"):
        load_official(hf, None, None)


# ------------------------------------------------------------------------------------------------------------
# Target mismatches and wrong shapes


def test_wrong_target_and_wrong_shapes(target, tmp_path):
    params, cfg = target
    e1 = save(tmp_path / "e1", eagle1_sd(d=32), "pytorch_model.bin", llama_config(d=32))
    with pytest.raises(DrafterCheckpointError, match=r"another target \(hidden_size=32\).*hidden_size=64"):
        load_official(e1, params, cfg)
    sd = eagle3_sd(vocab=120, draft_ids=np.arange(0, 120, 3))
    e3 = save(tmp_path / "e3", sd, "model.safetensors", llama_config(vocab=120, draft_vocab_size=40))
    with pytest.raises(
        DrafterCheckpointError, match=rf"another target \(vocab_size=120\).*vocab_size={cfg.vocab_size}"
    ):
        load_official(e3, params, cfg)
    e3t = save(tmp_path / "e3t", eagle3_sd(dt=48), "model.safetensors", llama_config(target_hidden_size=48))
    with pytest.raises(DrafterCheckpointError, match=r"target_hidden_size=48.*hidden_size=64"):
        load_official(e3t, params, cfg)
    m = save(tmp_path / "m", medusa_sd(2, H, 50), "medusa_lm_head.safetensors", {"medusa_num_heads": 2})
    with pytest.raises(
        DrafterCheckpointError, match=r"Medusa drafter was trained for another target \(vocab_size=50"
    ):
        load_official(m, params, cfg)
    sd = eagle1_sd()
    sd["layers.0.self_attn.k_proj.weight"] = torch.zeros(3 * DH, H)
    bad = save(tmp_path / "bad", sd, "model.safetensors", llama_config())
    with pytest.raises(
        DrafterCheckpointError,
        match=r"'layers.0.self_attn.k_proj.weight' has shape \[48, 64\], "
        r"expected \[32, 64\]",
    ):
        load_official(bad, params, cfg)
    sd = eagle1_sd()
    del sd["fc.bias"]  # config has no "bias": false, so the reference would run a random bias
    nobias = save(tmp_path / "nobias", sd, "pytorch_model.bin", llama_config())
    with pytest.raises(DrafterCheckpointError, match="no tensor 'fc.bias'"):
        load_official(nobias, params, cfg)
    sd = eagle1_sd()
    sd["layers.0.self_attn.q_proj.bias"] = torch.zeros(NH * DH)
    qkv = save(tmp_path / "qkv", sd, "model.safetensors", llama_config(qkv_bias=True))
    with pytest.raises(DrafterCheckpointError, match="qkv_bias.*not"):
        load_official(qkv, params, cfg)


# ------------------------------------------------------------------------------------------------------------
# In the loop: lossless


def test_imported_drafters_lossless(target, tmp_path):
    params, cfg = target
    builder = parse_tree("static:eagle1")
    ar = generate(params, cfg, PROMPTS, max_new_tokens=12).tokens
    ids = np.sort(np.random.default_rng(1).choice(cfg.vocab_size, 50, replace=False))
    folders = [
        save(tmp_path / "e1", eagle1_sd(), "pytorch_model.bin", llama_config()),
        save(
            tmp_path / "e3", eagle3_sd(draft_ids=ids), "model.safetensors", llama_config(draft_vocab_size=50)
        ),
        save(tmp_path / "m", medusa_sd(5, H, cfg.vocab_size), "medusa_lm_head.pt", {"medusa_num_heads": 5}),
    ]
    for folder in folders:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # well-formed checkpoints load without warnings
            d, dp = load_official(folder, params, cfg)
        out = generate(params, cfg, PROMPTS, max_new_tokens=12, drafter=d, draft_params=dp, builder=builder)
        assert out.tokens == ar, folder.name
    assert d.max_depth == 5  # the Medusa (last): 5 heads draft depths 1..5, as deep as static:eagle1

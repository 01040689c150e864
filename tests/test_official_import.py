"""Importing official Medusa / EAGLE-1 / EAGLE-3 / DFlash checkpoints (`specdec.drafters.official`).

The checkpoints are synthetic: random weights under the official tensor names and shapes, saved as
torch `.bin` / `.pt` and `.safetensors`. Numerics are checked against a small independent torch
re-implementation of the official forwards (reference notes §1.1-1.3), then the imported drafters
run in the decode loop, where greedy output must equal plain decoding.
"""

from __future__ import annotations

import json
import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from specdec.cache import causal_mask  # noqa: E402
from specdec.drafters import eagle, medusa  # noqa: E402
from specdec.drafters.checkpoint import DrafterCheckpointError  # noqa: E402
from specdec.drafters.official import is_official, load_official, read_tensors  # noqa: E402
from specdec.generate import generate  # noqa: E402
from specdec.matmul import plain  # noqa: E402
from specdec.models import to_device  # noqa: E402
from specdec.trees import parse_tree  # noqa: E402

H, NH, NKV, DH, FFN = 64, 4, 2, 16, 96  # the tiny target's shapes (tests/conftest.py)
PROMPTS = [[5, 9, 3, 5, 9], [12, 13, 14]]


@pytest.fixture(scope="module")
def target(tiny_models):
    _, loaded = tiny_models["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    return to_device(loaded.params, cfg), cfg


# ------------------------------------------------------------------------------------------------------------
# Synthetic official checkpoints


def rand(gen, *shape, scale=None):
    scale = shape[-1] ** -0.5 if scale is None else scale
    return (torch.randn(*shape, generator=gen) * scale).bfloat16().float()  # exact in bf16 files too


def save(folder, sd, name, config):
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / name))
    else:
        torch.save(sd, folder / name)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def medusa_sd(heads, d, vocab, own=True, seed=0, prefix=""):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(heads):
        sd[f"{prefix}{i}.0.linear.weight"] = rand(g, d, d)
        sd[f"{prefix}{i}.0.linear.bias"] = rand(g, d, scale=0.1)
        if own:
            sd[f"{prefix}{i}.1.weight"] = rand(g, vocab, d)
    return sd


def eagle1_sd(d=H, vocab=97, bias=True, seed=1, nh=NH, nkv=NKV, dh=DH, ffn=FFN):
    g = torch.Generator().manual_seed(seed)
    p = "layers.0."
    sd = {
        "embed_tokens.weight": rand(g, vocab, d),
        "fc.weight": rand(g, d, 2 * d),
        p + "self_attn.q_proj.weight": rand(g, nh * dh, d),
        p + "self_attn.k_proj.weight": rand(g, nkv * dh, d),
        p + "self_attn.v_proj.weight": rand(g, nkv * dh, d),
        p + "self_attn.o_proj.weight": rand(g, d, nh * dh),
        p + "mlp.gate_proj.weight": rand(g, ffn, d),
        p + "mlp.up_proj.weight": rand(g, ffn, d),
        p + "mlp.down_proj.weight": rand(g, d, ffn),
        p + "post_attention_layernorm.weight": 1 + rand(g, d, scale=0.1),
    }
    if bias:
        sd["fc.bias"] = rand(g, d, scale=0.1)
    return sd


def eagle3_sd(d=H, dt=H, vocab=97, draft_ids=None, naming="midlayer", seed=2, embed=False):
    g = torch.Generator().manual_seed(seed)
    p = naming + "."
    vd = vocab if draft_ids is None else len(draft_ids)
    sd = {
        "fc.weight": rand(g, d, 3 * dt),
        p + "hidden_norm.weight": 1 + rand(g, d, scale=0.1),
        p + "input_layernorm.weight": 1 + rand(g, d, scale=0.1),
        p + "post_attention_layernorm.weight": 1 + rand(g, d, scale=0.1),
        p + "self_attn.q_proj.weight": rand(g, NH * DH, 2 * d),
        p + "self_attn.k_proj.weight": rand(g, NKV * DH, 2 * d),
        p + "self_attn.v_proj.weight": rand(g, NKV * DH, 2 * d),
        p + "self_attn.o_proj.weight": rand(g, d, NH * DH),
        p + "mlp.gate_proj.weight": rand(g, FFN, d),
        p + "mlp.up_proj.weight": rand(g, FFN, d),
        p + "mlp.down_proj.weight": rand(g, d, FFN),
        "norm.weight": 1 + rand(g, d, scale=0.1),
        "lm_head.weight": rand(g, vd, d),
    }
    if draft_ids is not None:
        ids = torch.as_tensor(draft_ids, dtype=torch.int64)
        sd["d2t"] = ids - torch.arange(vd)
        sd["t2d"] = torch.zeros(vocab, dtype=torch.bool)
        sd["t2d"][ids] = True
    if embed:
        sd["embed_tokens.weight"] = rand(g, vocab, d, scale=1.0)
    return sd


def llama_config(d=H, vocab=97, **kw):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": FFN,
        "num_attention_heads": NH,
        "num_key_value_heads": NKV,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab,
        **kw,
    }


# ------------------------------------------------------------------------------------------------------------
# Independent torch reference of the official forwards


def t_rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def t_rope(x, pos, theta=10000.0):  # HF rotate-half, x [B, T, heads, Dh], pos [B, T]
    dh = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = pos[..., None].double() * inv
    ang = torch.cat([ang, ang], -1).float()[:, :, None]
    rot = torch.cat([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
    return x * ang.cos() + rot * ang.sin()


def t_attention(sd, p, x, pos):
    b, t, _ = x.shape
    q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(b, t, NH, DH)
    k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(b, t, NKV, DH)
    v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(b, t, NKV, DH)
    q, k = t_rope(q, pos), t_rope(k, pos)
    k, v = k.repeat_interleave(NH // NKV, dim=2), v.repeat_interleave(NH // NKV, dim=2)  # HF repeat_kv
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(DH)
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(b, t, NH * DH)
    return o @ sd[p + "self_attn.o_proj.weight"].T


def t_mlp(sd, p, h):
    x = t_rms(h, sd[p + "post_attention_layernorm.weight"])
    gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
    return h + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T


def t_eagle1(sd, emb, feat, pos, head):
    """cnets1: fc(cat(emb, feat)) -> layer 0 without input norm -> the target's head."""
    x = torch.cat([emb, feat], -1) @ sd["fc.weight"].T + sd.get("fc.bias", 0)
    h = x + t_attention(sd, "layers.0.", x, pos)
    return t_mlp(sd, "layers.0.", h) @ head


def t_eagle3(sd, emb, low, mid, high, pos, p="midlayer."):
    """cnets: g = fc(cat(low, mid, high)); layer over cat(input_norm(emb), hidden_norm(g)); norm; lm_head."""
    g = torch.cat([low, mid, high], -1) @ sd["fc.weight"].T
    x = torch.cat([t_rms(emb, sd[p + "input_layernorm.weight"]), t_rms(g, sd[p + "hidden_norm.weight"])], -1)
    h = g + t_attention(sd, p, x, pos)
    return t_rms(t_mlp(sd, p, h), sd["norm.weight"]) @ sd["lm_head.weight"].T


def inputs(vocab, b=2, t=6, widths=(H,), seed=5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    feats = [torch.randn(b, t, w, generator=g) for w in widths]
    pos = torch.arange(t)[None] + torch.tensor([[1], [7]])  # rows at different offsets
    return tokens, feats, pos


def j(x):
    return jnp.asarray(x.numpy())


def ours(d, dp, tokens, feats, pos):
    c = d.cfg
    fused = eagle.fuse(dp, c, tuple(j(f) for f in feats))
    out, _ = eagle.run_layer(dp, c, j(tokens), fused, j(pos), None, causal_mask(*tokens.shape))
    return np.asarray(eagle.draft_logits(dp, c, out))


def assert_close(a, b):
    np.testing.assert_allclose(a, np.asarray(b), atol=1e-4, rtol=1e-4)


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


def t_medusa(sd, feat, k, head=None):
    x = feat @ sd[f"{k}.0.linear.weight"].T + sd[f"{k}.0.linear.bias"]
    h = feat + torch.nn.functional.silu(x)
    return h @ (sd[f"{k}.1.weight"].T if head is None else head)


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
        save(tmp_path / "m", medusa_sd(4, H, cfg.vocab_size), "medusa_lm_head.pt", {"medusa_num_heads": 4}),
    ]
    for folder in folders:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # well-formed checkpoints load without warnings
            d, dp = load_official(folder, params, cfg, window=builder.window)
        out = generate(params, cfg, PROMPTS, max_new_tokens=12, drafter=d, draft_params=dp, builder=builder)
        assert out.tokens == ar, folder.name


# ------------------------------------------------------------------------------------------------------------
# DFlash (z-lab format)


def dflash_sd(layers=2, n_taps=2, seed=7, dflash2=False):
    g = torch.Generator().manual_seed(seed)
    sd = {"fc.weight": rand(g, H, n_taps * H), "hidden_norm.weight": 1 + rand(g, H, scale=0.1),
          "norm.weight": 1 + rand(g, H, scale=0.1)}  # fmt: skip
    for i in range(layers):
        p = f"layers.{i}."
        sd.update({
            p + "input_layernorm.weight": 1 + rand(g, H, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + rand(g, H, scale=0.1),
            p + "self_attn.q_proj.weight": rand(g, NH * DH, H),
            p + "self_attn.k_proj.weight": rand(g, NKV * DH, H),
            p + "self_attn.v_proj.weight": rand(g, NKV * DH, H),
            p + "self_attn.o_proj.weight": rand(g, H, NH * DH),
            p + "self_attn.q_norm.weight": 1 + rand(g, DH, scale=0.1),
            p + "self_attn.k_norm.weight": 1 + rand(g, DH, scale=0.1),
            p + "mlp.gate_proj.weight": rand(g, FFN, H), p + "mlp.up_proj.weight": rand(g, FFN, H),
            p + "mlp.down_proj.weight": rand(g, H, FFN),
        })  # fmt: skip
        if dflash2:
            sd[p + "attention_conv.base_kernel"] = rand(g, 2, 2, H)
    return sd


def dflash_config(layers=2, block=4, mask_id=7, ids=(0, 1)):
    return {"architectures": ["DFlashDraftModel"], "hidden_size": H, "num_attention_heads": NH,
            "num_key_value_heads": NKV, "head_dim": DH, "intermediate_size": FFN, "num_hidden_layers": layers,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "num_target_layers": 2, "model_type": "qwen3",
            "dflash_config": {"block_size": block, "mask_token_id": mask_id,
                              "target_layer_ids": list(ids)}}  # fmt: skip


def t_dflash(sd, layers, ctx_feats, block_emb, ctx_pos, blk_pos, head):
    """The DFlash block: c = hidden_norm(fc(taps)); every layer's K/V over [c ; block] (k_norm on
    both), q from the block (q_norm), non-causal; final norm; the target's head."""
    b, t, _ = ctx_feats.shape
    k_len = block_emb.shape[1]
    c = t_rms(ctx_feats @ sd["fc.weight"].T, sd["hidden_norm.weight"])
    h = block_emb
    for i in range(layers):
        p = f"layers.{i}.self_attn."
        x = t_rms(h, sd[f"layers.{i}.input_layernorm.weight"])
        q = t_rope(
            t_rms((x @ sd[p + "q_proj.weight"].T).view(b, k_len, NH, DH), sd[p + "q_norm.weight"]), blk_pos
        )
        kv_in, kv_pos = torch.cat([c, x], 1), torch.cat([ctx_pos, blk_pos], 1)
        k = (kv_in @ sd[p + "k_proj.weight"].T).view(b, t + k_len, NKV, DH)
        k = t_rope(t_rms(k, sd[p + "k_norm.weight"]), kv_pos)
        v = (kv_in @ sd[p + "v_proj.weight"].T).view(b, t + k_len, NKV, DH)
        k, v = k.repeat_interleave(NH // NKV, dim=2), v.repeat_interleave(NH // NKV, dim=2)
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(DH)
        o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(b, k_len, NH * DH)
        h = t_mlp(sd, f"layers.{i}.", h + o @ sd[p + "o_proj.weight"].T)
    return t_rms(h, sd["norm.weight"]) @ head


def test_dflash_numerics_and_lossless(target, tmp_path):
    from specdec.drafters import dflash

    params, cfg = target
    sd = dflash_sd()
    folder = save(tmp_path / "df", sd, "model.safetensors", dflash_config())
    assert is_official(folder) == "dflash"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        d, dp = load_official(folder, params, cfg)
    assert d.cfg.taps == (1, 2) and d.cfg.block_size == 4  # target layer id i = HF hidden_states[i + 1]
    g = torch.Generator().manual_seed(3)
    t = 6
    tokens = torch.randint(0, cfg.vocab_size, (2, t + 1), generator=g)  # the anchor at position t
    taps = [torch.randn(2, t + 1, H, generator=g) for _ in range(2)]
    emb = torch.from_numpy(np.asarray(params["embed"], np.float32))
    head = torch.from_numpy(
        np.asarray(plain(params["lm_head"]) if "lm_head" in params else params["embed"].T)
    )
    block_emb = torch.cat([emb[tokens[:, t]][:, None], emb[7][None, None].expand(2, 3, H)], 1)
    ctx_pos = torch.arange(t)[None].expand(2, t)
    want = t_dflash(
        sd,
        2,
        torch.cat([x[:, :t] for x in taps], -1),
        block_emb,
        ctx_pos,
        t + torch.arange(4)[None].expand(2, 4),
        head,
    )
    got = dflash.draft_logits(dp, d.cfg, dflash.train_forward(dp, d.cfg, j(tokens), tuple(j(x) for x in taps),
                                                                jnp.full((2, 1), t, jnp.int32)))  # fmt: skip
    assert_close(np.asarray(got)[:, 0], want.detach())
    ar = generate(params, cfg, PROMPTS, max_new_tokens=12).tokens
    for tree in ("chain:3", "dynamic:depth=3,topk=2,n=6"):
        out = generate(
            params, cfg, PROMPTS, max_new_tokens=12, drafter=d, draft_params=dp, builder=parse_tree(tree)
        )
        assert out.tokens == ar
    # refusals: DFlash-2 modules, another target
    bad = save(tmp_path / "df2", dflash_sd(dflash2=True), "model.safetensors", dflash_config())
    with pytest.raises(DrafterCheckpointError, match="DFlash-2"):
        load_official(bad, params, cfg)
    other = save(tmp_path / "dfo", sd, "model.safetensors", {**dflash_config(), "num_target_layers": 36})
    with pytest.raises(DrafterCheckpointError, match="num_target_layers=36"):
        load_official(other, params, cfg)

"""Synthetic official drafter checkpoints and an independent torch re-implementation of their
forwards (reference notes §1.1-1.3): random weights under the official tensor names and shapes,
saved as torch `.bin` / `.pt` and `.safetensors`. Shared by the official-import tests."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from specdec.cache import causal_mask  # noqa: E402
from specdec.drafters import eagle  # noqa: E402

H, NH, NKV, DH, FFN = 64, 4, 2, 16, 96  # the tiny target's shapes (tests/conftest.py)
PROMPTS = [[5, 9, 3, 5, 9], [12, 13, 14]]


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


def t_medusa(sd, feat, k, head=None):
    x = feat @ sd[f"{k}.0.linear.weight"].T + sd[f"{k}.0.linear.bias"]
    h = feat + torch.nn.functional.silu(x)
    return h @ (sd[f"{k}.1.weight"].T if head is None else head)


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

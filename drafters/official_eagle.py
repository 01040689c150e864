"""Official EAGLE-1 / EAGLE-3 heads -> `Eagle` (see `official.py` for the checks all imports share).

- EAGLE-1: `pytorch_model.bin` or `model.safetensors` + a one-layer LlamaConfig: `fc [H, 2H]` on
  `cat(embedding, feature)`, optional `fc.bias`, `layers.0.*` without an input norm. The stored
  `embed_tokens` is ignored (the target's is used, as the reference loader does).
- EAGLE-3: `fc [H, 3Ht]`, `midlayer.*` (or `layers.0.*`, the vLLM "speculators" naming) with
  `input_layernorm`, `hidden_norm` and 2H-wide q/k/v, `norm`, `lm_head [Vd, H]`, and the draft
  vocabulary as offsets `d2t` (target id = draft id + d2t[draft id]) with a mask `t2d [V]`. The
  layer normalises the target's embedding; only when `target_hidden_size` differs from the draft's
  `hidden_size` does it use the file's own `embed_tokens [V, H]` (as the reference `cnets.Model`).

Tap layers of EAGLE-3: HF `hidden_states` indices (the residual stream entering layer i), the
numbering of `EagleConfig.taps`. Default (2, L//2, L-3) of the target, as the reference code.
Explicit ids: `eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang / SpecForge configs) count
"the output of layer k", which SGLang captures before layer k + 1, so they are shifted by one; a
top-level `eagle_aux_hidden_state_layer_ids` (vLLM / speculators configs) is used as is, as vLLM
does.
"""

from __future__ import annotations

import pathlib
import re
import warnings

import jax.numpy as jnp
import numpy as np

from specdec.checkpoints.tensor_files import Tensors, read_tensors
from specdec.drafters import checkpoint
from specdec.drafters.checkpoint import DrafterCheckpointError
from specdec.drafters.eagle import Eagle, EagleConfig
from specdec.drafters.official import (
    EAGLE_FILES,
    checked_tensor,
    eagle_file,
    other_target,
    read_config,
    to_f32,
    warn_unused,
)
from specdec.models.config import ModelConfig


def _eagle_taps(cfg: dict, tcfg: ModelConfig, folder) -> tuple[int, ...]:
    L = tcfg.num_layers
    nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    top = cfg.get("eagle_aux_hidden_state_layer_ids")
    if nested:  # SGLang / SpecForge: "output of layer k" = HF hidden_states[k + 1]
        taps = tuple(int(i) + 1 for i in nested)
    elif top:  # vLLM / speculators: the state entering layer k = HF hidden_states[k]
        taps = tuple(int(i) for i in top)
    else:  # the reference: states entering layers 2, L//2, L-3 (clamped for toy targets)
        return tuple(min(max(i, 0), L) for i in (2, L // 2, L - 3))
    if len(taps) != 3 or not all(0 <= i <= L for i in taps):
        raise DrafterCheckpointError(
            f"{folder}: eagle_aux_hidden_state_layer_ids gives taps {list(taps)}; "
            f"EAGLE-3 takes three taps in 0..{L} for this {L}-layer target"
        )
    return taps


def load_eagle(folder: pathlib.Path, target_params, tcfg: ModelConfig):
    """(Eagle drafter, runtime params) from an official EAGLE-1 / EAGLE-3 folder, checked vs the target."""
    cfg = read_config(folder)
    f = eagle_file(folder)
    if f is None:
        raise DrafterCheckpointError(f"{folder} has no {' or '.join(EAGLE_FILES)}")
    t = read_tensors(f)
    v3 = any(k.startswith("midlayer.") or k.endswith("hidden_norm.weight") for k in t.shapes)
    if v3 and "midlayer.hidden_norm.weight" not in t:  # speculators naming: layers.0.* -> midlayer.*
        t = t.renamed({re.sub(r"^layers\.0\.", "midlayer.", k): k for k in t.shapes})
    lay = "midlayer." if v3 else "layers.0."
    family = "EAGLE-3" if v3 else "EAGLE-1"
    if cfg.get("num_hidden_layers", 1) != 1 or any(k.startswith("layers.1.") for k in t.shapes):
        raise DrafterCheckpointError(
            f"{folder}: num_hidden_layers={cfg.get('num_hidden_layers')}; specdec's "
            f"{family} drafter has one decoder layer (as every official one)"
        )
    qkv_bias = [k for k in t.shapes if re.fullmatch(rf"{re.escape(lay)}self_attn\.[qkvo]_proj\.bias", k)]
    if cfg.get("qkv_bias") or cfg.get("attention_bias") or qkv_bias:
        raise DrafterCheckpointError(
            f"{folder}: the draft layer has q/k/v projection biases (qkv_bias, "
            f"{qkv_bias or 'set in config.json'}), which specdec's EAGLE layer does not "
            "support (Qwen2 EAGLE checkpoints); no other EAGLE checkpoint has them"
        )
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise DrafterCheckpointError(
            f"{folder}: the draft layer uses RoPE scaling {scaling}, which specdec's "
            "EAGLE layer does not support (it applies plain RoPE)"
        )
    for flag in ("norm_before_residual", "norm_before_fc"):
        default = flag == "norm_before_residual" and "speculators_model_type" in cfg
        if cfg.get(flag, default):
            raise DrafterCheckpointError(
                f"{folder}: {flag}=true (a speculators variant of EAGLE-3) is not "
                "supported: specdec's layer follows the reference EAGLE-3 code"
            )
    try:
        d, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        ffn = int(cfg["intermediate_size"])
    except KeyError as e:
        raise DrafterCheckpointError(f"{folder}/config.json has no {e.args[0]!r}") from None
    nkv = int(cfg.get("num_key_value_heads") or nh)
    dh = int(cfg.get("head_dim") or d // nh)
    eps = float(cfg.get("rms_norm_eps", 1e-6))  # LlamaConfig's default, as the reference loader
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    dt = int(cfg.get("target_hidden_size") or d) if v3 else d
    if dt != tcfg.hidden_size:
        what = "target_hidden_size" if v3 and cfg.get("target_hidden_size") else "hidden_size"
        raise other_target(folder, family, what, dt, tcfg.hidden_size)
    vocab = int(cfg.get("vocab_size") or tcfg.vocab_size)
    if "t2d" in t:
        vocab = t.shapes["t2d"][0]
    elif not v3 and "embed_tokens.weight" in t:
        vocab = t.shapes["embed_tokens.weight"][0]
    if vocab != tcfg.vocab_size:
        raise other_target(folder, family, "vocab_size", vocab, tcfg.vocab_size)
    why = (
        f" (config.json: hidden_size={d}, heads={nh}, kv heads={nkv}, head_dim={dh}, intermediate_size={ffn}"
        f"{f', target_hidden_size={dt}' if v3 else ''})"
    )
    din = 2 * d if v3 else d
    get = lambda name, shape: checked_tensor(t, name, shape, why)
    used = {
        "fc.weight",
        lay + "self_attn.q_proj.weight",
        lay + "self_attn.k_proj.weight",
        lay + "self_attn.v_proj.weight",
        lay + "self_attn.o_proj.weight",
        lay + "mlp.gate_proj.weight",
        lay + "mlp.up_proj.weight",
        lay + "mlp.down_proj.weight",
        lay + "post_attention_layernorm.weight",
    }
    q = get(lay + "self_attn.q_proj.weight", (nh * dh, din))
    k = get(lay + "self_attn.k_proj.weight", (nkv * dh, din))
    v = get(lay + "self_attn.v_proj.weight", (nkv * dh, din))
    layer = {
        "wqkv": np.concatenate([q.T, k.T, v.T], axis=1),
        "wo": get(lay + "self_attn.o_proj.weight", (d, nh * dh)).T,
        "mlp_norm": get(lay + "post_attention_layernorm.weight", (d,)),
        "w_gate_up": np.concatenate(
            [get(lay + "mlp.gate_proj.weight", (ffn, d)).T, get(lay + "mlp.up_proj.weight", (ffn, d)).T],
            axis=1,
        ),
        "w_down": get(lay + "mlp.down_proj.weight", (d, ffn)).T,
    }
    p: dict = {"layer": layer, "fc_w": get("fc.weight", (d, 3 * dt if v3 else 2 * d)).T}
    d2t = own_embed = None
    fc_bias = False
    if v3:
        layer["input_norm"] = get(lay + "input_layernorm.weight", (d,))
        layer["hidden_norm"] = get(lay + "hidden_norm.weight", (d,))
        p["norm"] = get("norm.weight", (d,))
        vd = int(cfg.get("draft_vocab_size") or t.shapes.get("lm_head.weight", (vocab,))[0])
        p["lm_head"] = get("lm_head.weight", (vd, d)).T
        used |= {lay + "input_layernorm.weight", lay + "hidden_norm.weight", "norm.weight", "lm_head.weight"}
        d2t = _draft_vocab(t, folder, vd, vocab)
        taps = _eagle_taps(cfg, tcfg, folder)
        if d != dt:  # the layer normalises a width-H embedding: the draft's own (reference: cnets.Model)
            own_embed = get("embed_tokens.weight", (vocab, d))
            used.add("embed_tokens.weight")
    else:
        vd = vocab
        fc_bias = bool(cfg.get("bias", True))  # the reference: a missing key means bias=True
        if fc_bias:
            p["fc_b"] = checked_tensor(
                t, "fc.bias", (d,), ' (config.json has no "bias": false, so fc has a bias)'
            )
            used.add("fc.bias")
        taps = (tcfg.num_layers,)
    warn_unused(t, used, ignored={"embed_tokens.weight", "d2t", "t2d"})
    try:
        config = EagleConfig(
            version=3 if v3 else 1,
            vocab_size=tcfg.vocab_size,
            draft_vocab_size=vd,
            hidden_size=d,
            target_hidden_size=dt,
            num_heads=nh,
            num_kv_heads=nkv,
            head_dim=dh,
            intermediate_size=ffn,
            taps=taps,
            rms_norm_eps=eps,
            rope_theta=theta,
            fc_bias=fc_bias,
        )
        config.layer_cfg  # noqa: B018  (validates heads / head_dim)
    except ValueError as e:
        raise DrafterCheckpointError(f"{folder}: unsupported {family} shape: {e}") from None
    params = to_f32(p)
    if d2t is not None:
        params["d2t"] = d2t
    runtime = checkpoint.bind("eagle", config, params, target_params)
    if own_embed is not None:
        runtime["embed"] = jnp.asarray(own_embed, jnp.float32)
    return Eagle(config), runtime


def _draft_vocab(t: Tensors, folder, vd: int, vocab: int) -> np.ndarray | None:
    """Our absolute map d2t[i] = target id of draft id i (None: the identity)."""
    if "d2t" not in t:
        if vd != vocab:
            raise DrafterCheckpointError(
                f"{t.path} has a reduced draft vocabulary ({vd} of {vocab} tokens) "
                "but no d2t tensor mapping it to the target's; re-download it"
            )
        return None
    if tuple(t.shapes["d2t"]) != (vd,):
        raise DrafterCheckpointError(
            f"{t.path}: tensor 'd2t' has shape {list(t.shapes['d2t'])}, expected [{vd}] (draft_vocab_size)"
        )
    off = np.asarray(t.get("d2t"))
    if not np.issubdtype(off.dtype, np.integer):
        raise DrafterCheckpointError(
            f"{t.path}: tensor 'd2t' has dtype {off.dtype}, expected integers (offsets)"
        )
    ids = np.arange(vd, dtype=np.int64) + off.astype(np.int64)
    if ids.min() < 0 or ids.max() >= vocab or len(np.unique(ids)) != vd:
        raise DrafterCheckpointError(
            f"{t.path}: d2t maps draft ids outside 0..{vocab - 1} or twice onto one "
            "target id (it holds offsets: target = draft + d2t[draft]); the mapping "
            "is corrupt"
        )
    if "t2d" in t:
        mask = np.asarray(t.get("t2d")).astype(bool)
        if mask.sum() != vd or not mask[ids].all():
            warnings.warn(
                f"{t.path}: t2d does not mark exactly the target ids of d2t; using d2t", stacklevel=4
            )
    if vd == vocab and (ids == np.arange(vd)).all():
        return None
    return ids.astype(np.int32)

"""Import released DFlash checkpoints (z-lab `*-DFlash-b16` and compatible; reference notes
`frontier.md` §1.1) into specdec's `DFlash` drafter.

Format: `config.json` (a Qwen3 config: `hidden_size`, `num_attention_heads`, `num_key_value_heads`,
`head_dim`, `intermediate_size`, `num_hidden_layers`, `rms_norm_eps`, `rope_theta` or
`rope_parameters`, `num_target_layers`, and `dflash_config` = {`block_size`, `mask_token_id`,
`target_layer_ids`}) and `model.safetensors` with `fc.weight [H, n·Ht]`, `hidden_norm.weight`,
`norm.weight`, and per layer `layers.i.{input_layernorm, post_attention_layernorm}.weight`,
`self_attn.{q,k,v,o}_proj.weight`, `self_attn.{q,k}_norm.weight`, `mlp.{gate,up,down}_proj.weight`.
No embedding and no head: the target's are used. The mask positions' embedding is the target's
embedding row `mask_token_id` (DFlash adds `<|MASK|>` to the target's tokenizer). Target layer id
i is read as HF `hidden_states[i + 1]`, so specdec's tap is i + 1 (the off-by-one that costs a token
of τ when wrong, frontier.md §1.1).

DFlash-2 checkpoints (`attention_conv`, `mlp_conv`, `candidate_selector.*`) are refused: those
modules are not implemented. A sliding-window config is loaded with a warning: specdec's draft
attends to the whole context (the same drafts for contexts shorter than the window).
"""

from __future__ import annotations

import pathlib
import warnings

import numpy as np

from specdec.checkpoints.tensor_files import read_tensors
from specdec.drafters.checkpoint import DrafterCheckpointError, bind
from specdec.drafters.dflash import DFlash, DFlashConfig
from specdec.drafters.official import checked_tensor, other_target, read_config, to_f32, warn_unused
from specdec.models.config import ModelConfig


def load_dflash(folder: pathlib.Path, target_params, tcfg: ModelConfig):
    """(DFlash drafter, runtime params) from a released DFlash folder, checked against the target."""
    cfg = read_config(folder)
    f = folder / "model.safetensors"
    if not f.is_file():
        raise DrafterCheckpointError(f"{folder} has no model.safetensors (a DFlash checkpoint's weights)")
    t = read_tensors(f)
    if any(".attention_conv." in k or k.startswith("candidate_selector.") for k in t.shapes):
        raise DrafterCheckpointError(
            f"{folder} is a DFlash-2 checkpoint (attention/MLP convolutions, candidate selector), which "
            "specdec does not implement; DFlash(-1) checkpoints load"
        )
    dc = cfg.get("dflash_config") or {}
    try:
        d, nh, ffn = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["intermediate_size"])
        n_layers, ids, mask_id = (
            int(cfg["num_hidden_layers"]),
            list(dc["target_layer_ids"]),
            int(dc["mask_token_id"]),
        )
    except KeyError as e:
        raise DrafterCheckpointError(f"{folder}/config.json has no {e.args[0]!r} (DFlash's config)") from None
    nkv = int(cfg.get("num_key_value_heads") or nh)
    dh = int(cfg.get("head_dim") or d // nh)
    if d != tcfg.hidden_size:
        raise other_target(folder, "DFlash", "hidden_size", d, tcfg.hidden_size)
    if int(cfg.get("num_target_layers", tcfg.num_layers)) != tcfg.num_layers:
        raise other_target(folder, "DFlash", "num_target_layers", cfg["num_target_layers"], tcfg.num_layers)
    if not 0 <= mask_id < tcfg.vocab_size or max(ids) >= tcfg.num_layers:
        raise other_target(folder, "DFlash", "mask_token_id / target_layer_ids", (mask_id, ids),
                           f"vocab_size {tcfg.vocab_size}, {tcfg.num_layers} layers")  # fmt: skip
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
        warnings.warn(
            f"{folder}: the draft was trained with a {cfg.get('sliding_window')}-token sliding window; "
            "specdec's DFlash attends to the whole context (identical drafts below that length)",
            stacklevel=2,
        )
    rope = dict(cfg.get("rope_parameters") or {})
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    c = DFlashConfig(vocab_size=tcfg.vocab_size, draft_vocab_size=tcfg.vocab_size, hidden_size=d,
                     target_hidden_size=d, num_layers=n_layers, num_heads=nh, num_kv_heads=nkv, head_dim=dh,
                     intermediate_size=ffn, taps=tuple(i + 1 for i in ids),
                     block_size=int(dc.get("block_size", 16)),
                     rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta)  # fmt: skip
    used: set[str] = set()

    def get(name, shape):
        used.add(name)
        return checked_tensor(t, name, shape)

    layers = {}
    for i in range(n_layers):
        pre = f"layers.{i}."
        q = get(pre + "self_attn.q_proj.weight", (nh * dh, d))
        k = get(pre + "self_attn.k_proj.weight", (nkv * dh, d))
        v = get(pre + "self_attn.v_proj.weight", (nkv * dh, d))
        gate = get(pre + "mlp.gate_proj.weight", (ffn, d))
        up = get(pre + "mlp.up_proj.weight", (ffn, d))
        layers[str(i)] = {
            "input_norm": get(pre + "input_layernorm.weight", (d,)),
            "wqkv": np.concatenate([q, k, v], axis=0).T,
            "q_norm": get(pre + "self_attn.q_norm.weight", (dh,)),
            "k_norm": get(pre + "self_attn.k_norm.weight", (dh,)),
            "wo": get(pre + "self_attn.o_proj.weight", (d, nh * dh)).T,
            "mlp_norm": get(pre + "post_attention_layernorm.weight", (d,)),
            "w_gate_up": np.concatenate([gate, up], axis=0).T,
            "w_down": get(pre + "mlp.down_proj.weight", (d, ffn)).T,
        }
    params = {
        "fc_w": get("fc.weight", (d, len(ids) * d)).T,
        "hidden_norm": get("hidden_norm.weight", (d,)),
        "norm": get("norm.weight", (d,)),
        "layers": layers,
        "mask_embed": np.asarray(target_params["embed"][mask_id], np.float32),
    }
    warn_unused(t, used)
    return DFlash(c), bind("dflash", c, to_f32(params), target_params)

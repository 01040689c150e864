"""Shared by the checkpoint readers: the error type, the result type, and HF-named tensors -> the
specdec parameter pytree (presence, shape and leftover checks)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import transformers

from specdec.models.config import ModelConfig, UnsupportedModelError


class CheckpointError(ValueError):
    """A checkpoint could not be read; the message names the problem and how to fix it."""


class DrafterCheckpointError(ValueError):
    """A drafter checkpoint that cannot be used with this target; the message names the fix
    (`specdec.drafters.checkpoint` and the official-checkpoint readers raise it)."""


@dataclasses.dataclass
class LoadedModel:
    """What `load_model` returns. `params` follows the module docstring's pytree (numpy float32); `source` is
    the resolved path the weights came from."""

    params: dict
    cfg: ModelConfig
    tokenizer: transformers.PreTrainedTokenizerBase
    source: str


# ------------------------------------------------------------------------------------------------------------
# Shared: HF-named tensors -> specdec pytree


def _expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF-layout shape ([out, in] for Linear) for every tensor the model needs."""
    d, v, i = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, d),
            p + "mlp.up_proj.weight": (i, d),
            p + "mlp.down_proj.weight": (d, i),
        }
        if cfg.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
    return shapes


def _resolve_tie(
    cfg: ModelConfig, names: set[str], get: Callable[[str], np.ndarray], where: str
) -> ModelConfig:
    """Reconcile `tie_word_embeddings` with whether the checkpoint has its own lm_head."""
    has_head = "lm_head.weight" in names
    if not cfg.tie_word_embeddings and not has_head:
        # Some checkpoints say untied but ship no lm_head; transformers then ties them too.
        return cfg.replace(tie_word_embeddings=True)
    if cfg.tie_word_embeddings and has_head:
        head, embed = get("lm_head.weight"), get("model.embed_tokens.weight")
        if head.shape != embed.shape or not np.array_equal(head, embed):
            warnings.warn(
                f"{where}: tie_word_embeddings is true but lm_head.weight differs from the embedding; "
                "following the config (as transformers does) and ignoring lm_head.weight",
                stacklevel=3,
            )
    return cfg


def _build_params(
    cfg: ModelConfig,
    names: set[str],
    get: Callable[[str], np.ndarray],
    native: Callable[[str], str],
    where: str,
    put: Callable[[str, np.ndarray, ModelConfig], Any] | None = None,
) -> dict:
    """Assemble the pytree from HF-named, HF-layout float32 tensors; check presence, shapes and leftovers.

    `get(name)` returns one tensor (loaded lazily so peak memory stays ~one model); `native(name)` is the name
    the file uses, for messages. `put(key, array, cfg)`, when given, receives each assembled param
    (`key` = its pytree name, e.g. "wqkv") as soon as it is built and its result is stored instead:
    `specdec.sharding` places it on a device mesh, so the host holds ~one tensor at a time.
    """
    keep = (lambda key, x: x) if put is None else (lambda key, x: put(key, x, cfg))
    shapes = _expected_hf_shapes(cfg)
    missing = [n for n in shapes if n not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{where}: tensor {native(missing[0])!r} is missing{more}; the file does not match its config "
            f"({cfg.arch}, {cfg.num_layers} layers, attention_bias={cfg.attention_bias}). Re-download or "
            "re-export the checkpoint."
        )
    # Tensors we would silently ignore mean the model is not the one we run (e.g. o_proj or MLP biases).
    extra = sorted(
        n for n in names - shapes.keys() if n != "lm_head.weight" and not n.endswith("rotary_emb.inv_freq")
    )
    if extra:
        examples = [native(n) for n in extra[:3]]
        raise UnsupportedModelError(
            f"{where}: has tensors specdec's {cfg.arch} model does not use, e.g. {examples}; loading it "
            "would silently compute a different model. Use a plain Llama/Mistral/Qwen2 checkpoint."
        )

    def checked(name: str) -> np.ndarray:
        w = get(name)
        if tuple(w.shape) != shapes[name]:
            raise CheckpointError(
                f"{where}: tensor {native(name)!r} has shape {tuple(w.shape)}, expected {shapes[name]} from "
                "the config; the weights and config.json/metadata disagree — use the config that came with "
                "the weights."
            )
        return w

    def t(*names: str, transpose: bool = False) -> np.ndarray:
        """float32 copy of tensors joined on the last axis (each transposed first if asked), written
        into one fresh array: never a view into a memory-mapped file, no intermediate copies."""
        parts = [checked(n).T if transpose else checked(n) for n in names]
        out = np.empty(parts[0].shape[:-1] + (sum(w.shape[-1] for w in parts),), np.float32)
        lo = 0
        for w in parts:
            out[..., lo : lo + w.shape[-1]] = w
            lo += w.shape[-1]
        return out

    params: dict[str, Any] = {"embed": keep("embed", t("model.embed_tokens.weight")),
                              "final_norm": keep("final_norm", t("model.norm.weight"))}  # fmt: skip
    if not cfg.tie_word_embeddings:
        params["lm_head"] = keep("lm_head", t("lm_head.weight", transpose=True))

    def builders(p: str) -> dict[str, Callable[[], np.ndarray]]:
        """Layer `p`'s params, one thunk each: each is placed (`put`) before the next is read."""
        a, m = p + "self_attn.", p + "mlp."
        build = {
            "attn_norm": lambda: t(p + "input_layernorm.weight"),
            "wqkv": lambda: t(*(a + f"{x}_proj.weight" for x in "qkv"), transpose=True),
            "wo": lambda: t(a + "o_proj.weight", transpose=True),
            "mlp_norm": lambda: t(p + "post_attention_layernorm.weight"),
            "w_gate_up": lambda: t(m + "gate_proj.weight", m + "up_proj.weight", transpose=True),
            "w_down": lambda: t(m + "down_proj.weight", transpose=True),
        }
        if cfg.attention_bias:
            build["bqkv"] = lambda: t(*(a + f"{x}_proj.bias" for x in "qkv"))
        return build

    params["layers"] = [{k: keep(k, f()) for k, f in builders(f"model.layers.{n}.").items()}
                        for n in range(cfg.num_layers)]  # fmt: skip
    return params

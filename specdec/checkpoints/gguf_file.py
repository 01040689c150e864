"""GGUF files: read with the `gguf` package, dequantized, llama.cpp's rotary permutation undone, the
tokenizer rebuilt without torch. Loads are memoized in-process (see `_read_gguf`)."""

from __future__ import annotations

import copy
import functools
import logging
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from specdec.checkpoints.common import CheckpointError, LoadedModel, _build_params
from specdec.models.config import ModelConfig, UnsupportedModelError
from specdec.tokenizer import build_gguf_tokenizer

log = logging.getLogger(__name__)
MEMO_MAX_BYTES = 2 << 30  # GGUF files larger than this are not memoized

# ------------------------------------------------------------------------------------------------------------
# GGUF

# GGUF tensor name (per layer: prefix "blk.{n}.") -> HF name (per layer: prefix "model.layers.{n}.").
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_ARCHS = ("llama", "qwen2")  # Mistral and SmolLM2 GGUFs say "llama"
_REQUIRED = object()


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    if name.startswith("blk."):
        _, n, rest = name.split(".", 2)
        if rest in _GGUF_LAYER:
            return f"model.layers.{n}.{_GGUF_LAYER[rest]}"
    return None


def config_from_gguf_metadata(meta: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from GGUF metadata (`{key: value}`); `overrides` (e.g. tie_word_embeddings, attention_bias,
    vocab_size, which depend on the tensors) win over what the metadata says."""
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise UnsupportedModelError(
            f"GGUF general.architecture={arch!r} is not supported; specdec loads {_GGUF_ARCHS} GGUF files "
            "(Llama, Mistral and SmolLM2 files say 'llama'). Use an HF checkpoint of a supported model."
        )

    def key(name: str, default: Any = _REQUIRED) -> Any:
        k = f"{arch}.{name}"
        if k in meta:
            return meta[k]
        if default is _REQUIRED:
            raise CheckpointError(
                f"GGUF metadata lacks {k!r}; the file is incomplete — re-convert or re-download it"
            )
        return default

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    kv = key("attention.head_count_kv", heads)
    if isinstance(kv, list):  # per-layer counts (hybrid models)
        if len(set(kv)) != 1:
            raise UnsupportedModelError(
                f"GGUF has per-layer KV head counts {sorted(set(kv))}; specdec needs one"
            )
        kv = kv[0]
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError("GGUF uses partial rotary embeddings (rope.dimension_count < head_dim)")
    scaling = key("rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise UnsupportedModelError(
            f"GGUF rope scaling {scaling!r} is not supported from GGUF metadata; load the HF checkpoint "
            "folder instead"
        )
    eos: list[int] = []
    for k in ("eos_token_id", "eot_token_id", "eom_token_id"):
        i = meta.get(f"tokenizer.ggml.{k}")
        if i is not None and int(i) not in eos:
            eos.append(int(i))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    tokens = meta.get("tokenizer.ggml.tokens")
    kw: dict[str, Any] = dict(
        arch=arch,
        vocab_size=int(key("vocab_size", len(tokens) if tokens is not None else 0)),
        hidden_size=hidden,
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=head_dim,
        intermediate_size=int(key("feed_forward_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 4096)),
        attention_bias=arch == "qwen2",
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(eos),
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its convert script interleaves each head's rotary halves for its
    GPT-J-style RoPE) so HF's rotate-half RoPE applies. Works on [out, in] weights and [out] biases."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | pathlib.Path) -> LoadedModel:
    """Load a .gguf file: dequantized float32 params, config from metadata, a torch-free tokenizer.

    Memoized per (resolved path, mtime, size) for files up to `MEMO_MAX_BYTES`: the first load of the 135M
    Q4_1 file takes ~7 s on 2 CPU cores (≈3 s GGUFReader metadata parsing, ≈3.5 s dequantization), later
    ones ~0.2 s. Returned arrays are shared and read-only; the pytree containers and the tokenizer are fresh
    copies per call.
    """
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"GGUF file {p} does not exist; check the path")
    st = p.resolve().stat()
    read = _read_gguf if st.st_size <= MEMO_MAX_BYTES else _read_gguf.__wrapped__
    params, cfg, tok = read(str(p.resolve()), st.st_mtime_ns, st.st_size)
    fresh = {k: v for k, v in params.items() if k != "layers"}
    fresh["layers"] = [dict(layer) for layer in params["layers"]]
    return LoadedModel(params=fresh, cfg=cfg, tokenizer=copy.deepcopy(tok), source=str(p.resolve()))


@functools.lru_cache(maxsize=4)
def _read_gguf(path: str, mtime_ns: int, size: int) -> tuple[dict, ModelConfig, Any]:
    """The memo cache behind `load_gguf` (mtime_ns/size are part of the key so a rewritten file reloads)."""
    import gguf
    from gguf.quants import dequantize

    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise CheckpointError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); pass a .gguf file, an HF "
            "checkpoint folder or a registry name"
        )
    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except Exception as e:  # the reader fails with ValueError/IndexError on short or garbled files
        raise CheckpointError(
            f"{path} ({size} bytes) is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated "
            "or corrupt — re-download it"
        ) from e
    if "rope_freqs.weight" in tensors:
        raise UnsupportedModelError(
            f"{path} uses Llama-3.1-style RoPE frequency factors (rope_freqs.weight), which specdec reads "
            "only from HF config.json; load the HF checkpoint folder instead"
        )
    has_bias = "blk.0.attn_q.bias" in tensors
    embd = tensors.get("token_embd.weight")
    overrides: dict[str, Any] = {
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": has_bias,
    }
    if embd is not None and f"{meta.get('general.architecture')}.vocab_size" not in meta:
        overrides["vocab_size"] = int(embd.shape[-1])  # GGUF shapes are [in, out]: rows last
    cfg = config_from_gguf_metadata(meta, **overrides)
    try:
        tok = build_gguf_tokenizer({k: v for k, v in meta.items() if k.startswith("tokenizer.")})
    except KeyError as e:
        raise CheckpointError(
            f"{path}: GGUF tokenizer metadata lacks {e}; re-convert the file with llama.cpp"
        ) from e
    except ValueError as e:
        if isinstance(e, UnsupportedModelError):
            raise
        raise CheckpointError(
            f"{path}: GGUF tokenizer metadata is malformed ({e}); re-convert the file"
        ) from e

    hf_to_gguf = {h: g for g in tensors if (h := _gguf_to_hf_name(g)) is not None}
    unknown = [g for g in tensors if _gguf_to_hf_name(g) is None]
    # Unknown tensors are passed on so _build_params' leftover check reports them.
    names = set(hf_to_gguf) | {f"gguf:{g}" for g in unknown}

    def get(name: str) -> np.ndarray:
        t = tensors[hf_to_gguf[name]]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(
                f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}: {e}); the file is corrupt or "
                "uses a quantization this gguf package does not support — upgrade `gguf` or pick another one"
            ) from e
        # llama.cpp permutes Q/K only for arch 'llama' (GPT-J RoPE); qwen2 files use NeoX RoPE, unpermuted.
        if cfg.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = _unpermute_rotary(w, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        return w

    def native(name: str) -> str:
        if name in hf_to_gguf:
            return hf_to_gguf[name]
        if name.startswith("gguf:"):
            return name[5:]
        gl = {v: k for k, v in _GGUF_GLOBAL.items()}
        if name in gl:
            return gl[name]
        n, rest = name.removeprefix("model.layers.").split(".", 1)
        return f"blk.{n}." + {v: k for k, v in _GGUF_LAYER.items()}[rest]

    t1 = time.perf_counter()
    params = _build_params(cfg, names, get, native, path)
    for leaf in [params[k] for k in params if k != "layers"] + [
        a for la in params["layers"] for a in la.values()
    ]:
        leaf.flags.writeable = False  # shared by every caller of the memo cache
    log.info("loaded %s: metadata %.1fs, dequantize %.1fs", path, t1 - t0, time.perf_counter() - t1)
    return params, cfg, tok

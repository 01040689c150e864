"""HF checkpoint folders: config.json + model.safetensors, or model.safetensors.index.json and shards."""

from __future__ import annotations

import json
import logging
import pathlib

import ml_dtypes
import numpy as np
import transformers

from specdec.checkpoints.common import CheckpointError, LoadedModel, _build_params, _resolve_tie
from specdec.models.config import ModelConfig, UnsupportedModelError

log = logging.getLogger(__name__)

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


def load_hf_folder(path: str | pathlib.Path, *, put=None) -> LoadedModel:
    """Load an HF checkpoint folder: config.json, safetensors weights (single or sharded) and the tokenizer
    (`AutoTokenizer.from_pretrained(path)`, local files only). EOS ids are the union of config.json's and
    generation_config.json's. Not memoized. `put`: see `_build_params` (streams tensors to devices)."""
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
    params = _build_params(cfg, names, get, lambda n: n, where, put)
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

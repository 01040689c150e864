"""Derived targets: a base checkpoint with some of its arrays replaced (a fine-tuned backbone).

Joint training (Medusa-2) fine-tunes a target's last layers and final norm; the new target is the
base with those arrays replaced, stored as a folder of the replaced arrays only (a few layers, not
the whole model):

    target.json          {"format": "specdec-target", "base": "<registry name or path>",
                          "base_fingerprint": [...], "replaced": ["final_norm", "layers.28.wqkv", ...],
                          "training": {...}}
    params.safetensors   the replaced arrays by pytree name ("layers.28.wqkv", "final_norm"), in the
                         loader's layout (Linear weights [in, out]); bf16 or f32

`load_derived` loads the base (`specdec.loading.load_model`: a registry name, an HF folder or a GGUF
file), checks its embedding fingerprint (the base must be the one trained from) and replaces the
arrays; the tokenizer and config are the base's. `load_model` loads such a folder like any target,
and the package ships derived targets under registry names (`specdec/data/targets/<name>`).
"""

from __future__ import annotations

import json
import os
import pathlib

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from specdec.checkpoints.common import CheckpointError, LoadedModel
from specdec.models.config import ModelConfig

FORMAT = "specdec-target"
META = "target.json"


def fingerprint(params, cfg: ModelConfig) -> list[float]:
    """Norms of 8 spread-out embedding rows: tells models apart, survives quantization (~1%)."""
    rows = [(k + 1) * cfg.vocab_size // 9 for k in range(8)]
    emb = np.asarray(params["embed"][np.asarray(rows)], np.float32)
    return [round(float(x), 4) for x in np.linalg.norm(emb, axis=1)]


def backbone_fingerprint(params, cfg: ModelConfig, layers: int | None = None) -> list[float]:
    """Norms of the final norm and of the last layer's norms and down projection: tells a fine-tuned
    backbone from its base (whose embedding, and so `fingerprint`, it shares). `layers`: of the
    first `layers` layers only (a drafter reading no deeper, S2D: the final norm's entry is then 0).
    Host or device params, layers stacked (`scan_layers`) or listed, plain or packed
    (`specdec.matmul`: a packed weight's tiles hold its elements and zeros: the same norm)."""
    stack, i = params["layers"], (cfg.num_layers if layers is None else layers) - 1

    def at(name):  # layer i's array (a packed weight's tiles)
        x = stack[name] if isinstance(stack, dict) else stack[i][name]
        x = getattr(x, "tiles", x)
        return np.asarray(x[i] if isinstance(stack, dict) else x, np.float32)

    final = np.linalg.norm(np.asarray(params["final_norm"], np.float32)) if layers is None else 0.0
    return [
        round(float(v), 5)
        for v in (final, *(np.linalg.norm(at(n)) for n in ("attn_norm", "mlp_norm", "w_down")))
    ]


def is_derived(path: os.PathLike) -> bool:
    return (pathlib.Path(path) / META).is_file()


def save_derived(path: os.PathLike, base: str, base_params, cfg: ModelConfig, replaced: dict[str, np.ndarray],
                 *, training: dict | None = None, dtype: str = "bfloat16") -> pathlib.Path:  # fmt: skip
    """Write a derived target: `base` (its spec, as `load_model` takes it) with `replaced`
    ({"final_norm": [D], "layers.28.wqkv": [D, F], ...}, the loader's names and layout)."""
    for name, arr in replaced.items():
        have = _shape(base_params, name)
        if have != tuple(arr.shape):
            raise ValueError(f"replaced array {name}: shape {arr.shape}, the base has {have}")
    store = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    flat = {k: np.asarray(v, np.float32).astype(store) for k, v in replaced.items()}
    meta = {"format": FORMAT, "base": str(base), "base_fingerprint": fingerprint(base_params, cfg),
            "replaced": sorted(replaced), "training": training or {}}  # fmt: skip
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(tmp / "params.safetensors"))
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_derived(path: os.PathLike, *, name: str | None = None) -> LoadedModel:
    """The base of the derived target at `path` with its arrays replaced (`source`: `name` if given,
    e.g. a registry name, else the folder)."""
    from specdec.loading import load_model  # the base is any checkpoint load_model reads

    folder = pathlib.Path(path)
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / META} is unreadable ({e}); re-export the derived target") from None
    if meta.get("format") != FORMAT or "base" not in meta:
        raise CheckpointError(f"{folder / META} is not a {FORMAT} file; re-export the derived target")
    base = load_model(meta["base"])
    fp = fingerprint(base.params, base.cfg)
    if not np.allclose(fp, meta["base_fingerprint"], rtol=0.02):
        raise CheckpointError(
            f"derived target {folder} was trained from another model than its base {meta['base']} "
            f"(embedding fingerprint {fp} vs {meta['base_fingerprint']}); restore that base checkpoint"
        )
    arrays = load_file(str(folder / "params.safetensors"))
    if sorted(arrays) != sorted(meta["replaced"]):
        raise CheckpointError(f"{folder}: params.safetensors does not hold the arrays target.json lists")
    params = {k: v for k, v in base.params.items() if k != "layers"}
    layers = [dict(lp) for lp in base.params["layers"]]  # fresh dicts: the base's arrays may be memoized
    params["layers"] = layers
    for key, arr in arrays.items():
        have = _get(params, key)
        if tuple(have.shape) != tuple(arr.shape):
            raise CheckpointError(f"{folder}: {key} has shape {arr.shape}, the base {tuple(have.shape)}")
        arr = np.asarray(arr, np.float32)
        if key.startswith("layers."):
            _, i, leaf = key.split(".")
            layers[int(i)][leaf] = arr
        else:
            params[key] = arr
    return LoadedModel(params=params, cfg=base.cfg, tokenizer=base.tokenizer, source=name or str(folder))


def _shape(params, key: str) -> tuple[int, ...]:
    """The shape of array `key` of host or device params (stacked layers: one layer's; a packed
    weight: the plain one's, `PackedWeight.shape`)."""
    if key.startswith("layers.") and isinstance(params["layers"], dict):
        _, _, leaf = key.split(".")
        return tuple(params["layers"][leaf].shape[1:])
    return tuple(_get(params, key).shape)


def _get(params, key: str):
    if key.startswith("layers."):
        _, i, leaf = key.split(".")
        layers = params["layers"]
        if isinstance(layers, dict):
            return np.asarray(layers[leaf][int(i)])
        return layers[int(i)][leaf]
    if key not in params:
        raise CheckpointError(f"derived target: the base has no array {key}")
    return params[key]

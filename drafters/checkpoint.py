"""Self-describing drafter checkpoints, and binding a drafter to its target's shared arrays.

A checkpoint is a folder:

    drafter.json         {"format": "specdec-drafter",
                          "family": "medusa" | "amphista" | "eagle" | "falcon" | "dflash" | ...,
                          "config": {...}, "target": {source, sizes, fingerprint}, "training": {...}}
    params.safetensors   trained arrays by dotted name ("layer.wqkv"); bf16 or f32; "d2t" int32

`load` checks the checkpoint against the target it is about to draft for (vocabulary, hidden size,
layers, and a fingerprint of the embedding table) and raises `DrafterCheckpointError` naming the
mismatch. `bind` adds the shared target arrays (embedding, head rows) by reference: they are never
stored in a checkpoint. Both follow the family's registry entry (`specdec.drafters.family`): the
"family" of `drafter.json` is its `Family.stored` name (EAGLE-1 and EAGLE-3 are both "eagle", told
apart by `config.version`), and `Family.shares(config)` names the shared arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from specdec.checkpoints.common import DrafterCheckpointError
from specdec.drafters import family as families
from specdec.drafters.family import Family
from specdec.matmul import layout_of, pack_params, plain
from specdec.models.config import ModelConfig

FORMAT = "specdec-drafter"
FAMILIES = families.FAMILIES  # the registry: name -> Family


def fingerprint(target_params, cfg: ModelConfig) -> list[float]:
    """Norms of 8 spread-out embedding rows: tells models apart, survives quantization (~1%)."""
    rows = [(k + 1) * cfg.vocab_size // 9 for k in range(8)]
    emb = np.asarray(target_params["embed"][np.asarray(rows)], np.float32)
    return [round(float(x), 4) for x in np.linalg.norm(emb, axis=1)]


def target_info(target_params, cfg: ModelConfig, source: str) -> dict:
    return {"source": str(source), "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers, "fingerprint": fingerprint(target_params, cfg)}  # fmt: skip


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _unflatten(flat):
    out: dict = {}
    for k, v in flat.items():
        *parents, leaf = k.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def save(path: os.PathLike, family: str, config, params: dict, target: dict, *, d2t=None,
         training: dict | None = None, dtype: str = "bfloat16") -> pathlib.Path:  # fmt: skip
    """Write a checkpoint folder (atomically: a temporary folder renamed into place)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    store = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    flat = {k: np.asarray(v, np.float32).astype(store) for k, v in _flatten(params).items()}
    if d2t is not None:
        flat["d2t"] = np.asarray(d2t, np.int32)
    save_file(flat, str(tmp / "params.safetensors"))
    cfg = dataclasses.asdict(config)
    meta = {"format": FORMAT, "family": family, "config": cfg, "target": target, "training": training or {}}
    (tmp / "drafter.json").write_text(json.dumps(meta, indent=1))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def is_checkpoint(path: os.PathLike) -> bool:
    return (pathlib.Path(path) / "drafter.json").is_file()


def read(path: os.PathLike) -> tuple[dict, dict]:
    """(metadata, params as numpy f32 / int32) of a checkpoint folder.

    Checks what `load`, `make_config`, `check_target` and training's --init_from read, so a damaged or
    hand-written checkpoint fails here with a one-line `DrafterCheckpointError` naming the file, what
    is wrong with it and the fix, not later with a KeyError or a TypeError.
    """
    path = pathlib.Path(path)
    fix = "re-train it with specdec-train or re-copy the whole checkpoint folder"
    meta_file, params_file = path / "drafter.json", path / "params.safetensors"
    for f in (meta_file, params_file):  # both first: a half-copied folder says so, whichever half
        if not f.is_file():
            raise DrafterCheckpointError(
                f"{path} is not a complete drafter checkpoint: {f.name} is missing; {fix}"
            )
        if f.stat().st_size == 0:
            raise DrafterCheckpointError(f"{f} is empty (0 bytes: an interrupted write or copy?); {fix}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DrafterCheckpointError(f"{meta_file} is unreadable ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = f"format {meta.get('format')!r}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise DrafterCheckpointError(
            f"{meta_file} is not a {FORMAT} file ({what}, expected a JSON object with format {FORMAT!r}); "
            "pass a folder written by specdec-train (RUN/drafter) or a shipped drafter's name"
        )
    family = meta.get("family")
    if family not in families.stored_names():
        raise DrafterCheckpointError(
            f"{meta_file}: unknown drafter family {family!r} (this specdec knows "
            f"{', '.join(families.stored_names())}); {fix}, or use the specdec version that wrote it"
        )
    for key in ("config", "target"):
        if not isinstance(meta.get(key), dict):
            got = "is missing" if key not in meta else f"is a {type(meta[key]).__name__}, not an object"
            raise DrafterCheckpointError(
                f"{meta_file}: the required key {key!r} {got} (a {FORMAT} file lists format, family, "
                f"config and target); {fix}"
            )
    fields = {f.name: f for f in dataclasses.fields(families.config_class(family)) if f.init}
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # fmt: skip
    missing = [n for n in required if n not in meta["config"]]
    unknown = sorted(set(meta["config"]) - set(fields))
    if missing or unknown:
        what = f"lacks {', '.join(missing)}" if missing else f"has unknown {', '.join(unknown)}"
        raise DrafterCheckpointError(
            f"{meta_file}: 'config' {what} (the settings of the {family} drafter); {fix}, or use the specdec "
            "version that wrote it"
        )
    target = meta["target"]

    def number(v):  # JSON also parses NaN and Infinity
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    expect = {  # what check_target reads
        "source": lambda v: isinstance(v, str),
        "vocab_size": lambda v: number(v) and float(v).is_integer(),
        "hidden_size": lambda v: number(v) and float(v).is_integer(),
        "num_layers": lambda v: number(v) and float(v).is_integer(),
        "fingerprint": lambda v: isinstance(v, list) and len(v) == 8 and all(map(number, v)),
    }
    for key, ok in expect.items():
        if key not in target or not ok(target[key]):
            got = "is missing" if key not in target else f"is malformed ({target[key]!r})"
            raise DrafterCheckpointError(
                f"{meta_file}: 'target' {key!r} {got} (the target the drafter was trained for); {fix}"
            )
    try:
        flat = load_file(str(params_file))
    except Exception as e:  # OS and safetensors' own error types
        raise DrafterCheckpointError(f"{params_file} is corrupt ({type(e).__name__}: {e}); {fix}") from None
    if not flat:
        raise DrafterCheckpointError(f"{params_file} holds no arrays; {fix}")
    flat = {k: (v if k == "d2t" else np.asarray(v, np.float32)) for k, v in flat.items()}
    return meta, _unflatten(flat)


def make_config(meta: dict):
    """The config dataclass of a checkpoint's metadata (JSON lists back to tuples: configs are hashable)."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    return families.config_class(meta["family"])(**kw)


def family_of(meta: dict, config=None) -> Family:
    """The registry entry of a checkpoint's metadata (EAGLE-1 vs EAGLE-3: by `config.version`)."""
    try:
        return families.for_checkpoint(meta["family"], make_config(meta) if config is None else config)
    except ValueError as e:
        raise DrafterCheckpointError(str(e)) from None


def check_target(meta: dict, target_params, cfg: ModelConfig, path) -> None:
    t = meta["target"]
    for key, have in (("vocab_size", cfg.vocab_size), ("hidden_size", cfg.hidden_size),
                      ("num_layers", cfg.num_layers)):  # fmt: skip
        if t[key] != have:
            raise DrafterCheckpointError(
                f"drafter {path} was trained for {t['source']} ({key}={t[key]}), but this target has "
                f"{key}={have}: a drafter only works with its own target; train one for this target "
                "with specdec-train"
            )
    fp = fingerprint(target_params, cfg)
    if not np.allclose(fp, t["fingerprint"], rtol=0.02):
        raise DrafterCheckpointError(
            f"drafter {path} was trained for {t['source']}, and this target has the same shapes but "
            f"different weights (embedding fingerprint {fp} vs {t['fingerprint']}); train one for this "
            "target with specdec-train"
        )


def target_head(target_params) -> jnp.ndarray:
    """The target's LM head as a plain [D, V] array (tied heads: the embedding, transposed)."""
    if "lm_head" in target_params:
        return plain(target_params["lm_head"])
    return target_params["embed"].T


def bind(family: str | Family, config, params: dict, target_params) -> dict:
    """Runtime params: trained arrays + the target's embedding / head (rows at d2t) by reference,
    in the target's matmul layout (`specdec.matmul`: packed on CPU). `family`: its registry entry or
    its stored name (`drafter.json`'s "family", e.g. "eagle" for EAGLE-1 and EAGLE-3)."""
    if not isinstance(family, Family):
        family = families.for_checkpoint(family, config)
    shares = family.shared(config)
    p = {k: v for k, v in params.items()}
    d2t = params.get("d2t")
    if "lm_head" in p:  # a trained head (EAGLE-3's) is stored as lm_head and drafts as head
        p["head"] = p.pop("lm_head")
    if "head" in shares and d2t is None:  # the target's own head, shared in its layout
        p["head"] = target_params["lm_head"] if "lm_head" in target_params else target_params["embed"].T
    elif "head" in shares:
        p["head"] = jnp.take(target_head(target_params), jnp.asarray(d2t), axis=1)
    if "embed" in shares:
        p["embed"] = target_params["embed"]
    if d2t is not None:
        p["d2t"] = jnp.asarray(d2t, jnp.int32)
    return pack_params(p, layout_of(target_params))


def load(path: os.PathLike, target_params, cfg: ModelConfig):
    """(drafter, runtime params) for a checkpoint folder, checked against the target."""
    meta, params = read(path)
    check_target(meta, target_params, cfg, path)
    config = make_config(meta)
    family = family_of(meta, config)
    params = {k: (v if k == "d2t" else _to_jnp(v)) for k, v in params.items()}
    return family.drafter(config), bind(family, config, params, target_params)


def _to_jnp(tree):
    if isinstance(tree, dict):
        return {k: _to_jnp(v) for k, v in tree.items()}
    return jnp.asarray(tree, jnp.float32)

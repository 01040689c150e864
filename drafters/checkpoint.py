"""Self-describing drafter checkpoints, and binding a drafter to its target's shared arrays.

A checkpoint is a folder:

    drafter.json         {"format": "specdec-drafter",
                          "family": "medusa" | "amphista" | "eagle" | "falcon" | "dflash" | ...,
                          "config": {...}, "target": {source, sizes, fingerprint}, "training": {...},
                          optional "accept": {"t0": {temperature, layers, weight_mismatch, confidence,
                                                     threshold, training, calibration}, "t1": {...}}}
    params.safetensors   trained arrays by dotted name ("layer.wqkv"); bf16 or f32; "d2t" int32;
                         SpecDec++ acceptance heads as "accept.<key>.res_w" etc.

"accept" lists the acceptance heads (`specdec.drafters.accept_head`) trained for the drafter, one per
sampling temperature; `load` gives them to the drafter (`accept_heads`), whose optional contract
members `acceptance` / `threshold` then exist. "threshold" is null until a sweep measures one (set it
by hand in drafter.json or with `record_threshold`). Checkpoints without "accept" load as before.

`load` checks the checkpoint against the target it is about to draft for (vocabulary, hidden size,
layers, and a fingerprint of the embedding table) and raises `DrafterCheckpointError` naming the
mismatch. `bind` adds the shared target arrays (embedding, head rows) by reference: they are never
stored in a checkpoint. Both follow the family's registry entry (`specdec.drafters.family`): the
"family" of `drafter.json` is its `Family.stored` name (EAGLE-1 and EAGLE-3 are both "eagle", told
apart by `config.version`), and `Family.shares(config)` names the shared arrays.

A drafter built from the target itself has no trained arrays of its own, only acceptance heads: its
checkpoint is heads-only (`MODEL_FAMILIES`: "layerskip", config `{"num_layers": K}`; the params hold
`accept.*` alone, none before heads are trained). `load` builds it from the target
(`draft_model.layer_skip`) and adds the heads.
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
from specdec.checkpoints.derived import backbone_fingerprint, fingerprint
from specdec.drafters import accept_head
from specdec.drafters import family as families
from specdec.drafters.draft_model import LayerSkipConfig, layer_skip
from specdec.drafters.family import Family
from specdec.matmul import layout_of, pack_params, plain
from specdec.models.config import ModelConfig

FORMAT = "specdec-drafter"
FAMILIES = families.FAMILIES  # the registry: name -> Family
# drafters built from the target (no arrays of their own): stored family -> config class
MODEL_FAMILIES: dict[str, type] = {"layerskip": LayerSkipConfig}


def _config_class(stored: str) -> type:
    return MODEL_FAMILIES.get(stored) or families.config_class(stored)


def target_info(target_params, cfg: ModelConfig, source: str, layers: int | None = None) -> dict:
    """drafter.json's "target": its source, sizes, the embedding `fingerprint` and the `backbone`
    fingerprint (tells a fine-tuned backbone, e.g. Medusa-2's, from its base) of the layers the
    drafter reads (`layers`: the first ones only, "backbone_layers"; None: all and the final norm)."""
    info = {"source": str(source), "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers, "fingerprint": fingerprint(target_params, cfg),
            "backbone": backbone_fingerprint(target_params, cfg, layers)}  # fmt: skip
    if layers is not None:
        info["backbone_layers"] = int(layers)
    return info


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
         training: dict | None = None, dtype: str = "bfloat16",
         accept: dict | None = None) -> pathlib.Path:  # fmt: skip
    """Write a checkpoint folder (atomically: a temporary folder renamed into place). `accept`: the
    drafter.json "accept" object of the acceptance heads in `params["accept"]` (None: no heads)."""
    store = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    flat = {k: np.asarray(v, np.float32).astype(store) for k, v in _flatten(params).items()}
    if d2t is not None:
        flat["d2t"] = np.asarray(d2t, np.int32)
    cfg = dataclasses.asdict(config)
    meta = {"format": FORMAT, "family": family, "config": cfg, "target": target, "training": training or {}}
    if accept:
        meta["accept"] = accept
    return _write(path, meta, flat)


def _write(path: os.PathLike, meta: dict, flat: dict) -> pathlib.Path:
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(tmp / "params.safetensors"))
    (tmp / "drafter.json").write_text(json.dumps(meta, indent=1))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def with_accept_heads(src: os.PathLike, dest: os.PathLike, heads: dict[str, tuple[dict, dict]], *,
                      dtype: str = "bfloat16") -> pathlib.Path:  # fmt: skip
    """Copy checkpoint `src` to `dest` (may be the same folder) with acceptance heads added or
    replaced: `heads[key] = (head params, its drafter.json "accept" entry)`. The drafter's own
    arrays are copied bit for bit; heads of other keys already in `src` are kept."""
    meta, _ = read(src)  # validates src
    flat = load_file(str(pathlib.Path(src) / "params.safetensors"))
    store = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    accept = dict(meta.get("accept") or {})
    for key, (params, entry) in heads.items():
        flat = {k: v for k, v in flat.items() if not k.startswith(f"accept.{key}.")}
        for name, v in params.items():
            flat[f"accept.{key}.{name}"] = np.asarray(v, np.float32).astype(store)
        accept[key] = entry
    meta["accept"] = {k: accept[k] for k in sorted(accept)}
    out = _write(dest, meta, flat)
    read(out)  # the result validates (heads and their entries agree)
    return out


def digest(path: os.PathLike) -> str:
    """A short hash of a checkpoint's drafter (its config and arrays, acceptance heads excluded):
    equal for copies with other heads, different for another drafter."""
    import hashlib

    meta, _ = read(path)
    h = hashlib.sha256(json.dumps(meta["config"], sort_keys=True).encode())
    if meta["family"] in MODEL_FAMILIES:  # its arrays are the target's
        h.update(json.dumps([meta["family"], meta["target"]], sort_keys=True).encode())
    flat = load_file(str(pathlib.Path(path) / "params.safetensors"))
    for k in sorted(flat):
        if not k.startswith("accept."):
            h.update(k.encode())
            h.update(np.ascontiguousarray(flat[k]).tobytes())
    return h.hexdigest()[:16]


def record_threshold(path: os.PathLike, temperature: float, threshold: float | None, **record) -> None:
    """Record the stop threshold measured for the acceptance head at `temperature` in drafter.json
    (`record`: how it was measured, e.g. sweep=..., command=...); the params are untouched."""
    path = pathlib.Path(path)
    meta, _ = read(path)
    key = accept_head.key_of(temperature)
    if key not in (meta.get("accept") or {}):
        have = sorted(meta.get("accept") or {})
        raise DrafterCheckpointError(f"{path} has no acceptance head {key!r} (it has {have})")
    meta["accept"][key]["threshold"] = threshold
    if record:
        meta["accept"][key]["threshold_record"] = record
    tmp = path / "drafter.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / "drafter.json")


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
    known = families.stored_names() + list(MODEL_FAMILIES)
    if family not in known:
        raise DrafterCheckpointError(
            f"{meta_file}: unknown drafter family {family!r} (this specdec knows "
            f"{', '.join(known)}); {fix}, or use the specdec version that wrote it"
        )
    for key in ("config", "target"):
        if not isinstance(meta.get(key), dict):
            got = "is missing" if key not in meta else f"is a {type(meta[key]).__name__}, not an object"
            raise DrafterCheckpointError(
                f"{meta_file}: the required key {key!r} {got} (a {FORMAT} file lists format, family, "
                f"config and target); {fix}"
            )
    fields = {f.name: f for f in dataclasses.fields(_config_class(family)) if f.init}
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
        "backbone": lambda v: isinstance(v, list) and len(v) == 4 and all(map(number, v)),
    }
    for key, ok in expect.items():
        if key == "backbone" and key not in target:  # (optional: older checkpoints lack it)
            continue
        if key not in target or not ok(target[key]):
            got = "is missing" if key not in target else f"is malformed ({target[key]!r})"
            raise DrafterCheckpointError(
                f"{meta_file}: 'target' {key!r} {got} (the target the drafter was trained for); {fix}"
            )
    try:
        flat = load_file(str(params_file))
    except Exception as e:  # OS and safetensors' own error types
        raise DrafterCheckpointError(f"{params_file} is corrupt ({type(e).__name__}: {e}); {fix}") from None
    if family in MODEL_FAMILIES:  # heads-only: the drafter's arrays are the target's
        own = sorted(k for k in flat if not k.startswith("accept."))
        if own:
            raise DrafterCheckpointError(
                f"{params_file} holds arrays {own[:3]} but a {family} drafter's arrays are the target's "
                f"(only accept.* belong here); {fix}"
            )
    elif not flat:
        raise DrafterCheckpointError(f"{params_file} holds no arrays; {fix}")
    flat = {k: (v if k == "d2t" else np.asarray(v, np.float32)) for k, v in flat.items()}
    params = _unflatten(flat)
    _check_accept(meta, params, meta_file, fix)
    return meta, params


def _check_accept(meta: dict, params: dict, meta_file, fix: str) -> None:
    """drafter.json's "accept" and the params' "accept.*" arrays describe the same heads."""
    accept, arrays = meta.get("accept"), params.get("accept", {})
    if accept is None and not arrays:
        return
    if not isinstance(accept, dict) or not isinstance(arrays, dict):
        raise DrafterCheckpointError(
            f"{meta_file}: the params hold acceptance heads {sorted(arrays)} that 'accept' does not "
            f"describe; {fix}"
        )
    try:
        specs = accept_head.specs_from_meta(accept)
    except (KeyError, TypeError, ValueError) as e:
        what = f"{type(e).__name__}: {e}"
        raise DrafterCheckpointError(f"{meta_file}: 'accept' is malformed ({what}); {fix}") from None
    have = sorted(arrays)
    if sorted(s.key for s in specs) != have:
        raise DrafterCheckpointError(
            f"{meta_file}: 'accept' lists heads {sorted(accept)} but the params hold {have}; {fix}"
        )
    for spec in specs:
        head = arrays[spec.key]
        if not isinstance(head, dict) or sorted(head) != sorted(spec.param_names):
            got = sorted(head) if isinstance(head, dict) else type(head).__name__
            raise DrafterCheckpointError(
                f"{meta_file}: acceptance head {spec.key!r} has arrays {got}, expected "
                f"{list(spec.param_names)}; {fix}"
            )


def make_config(meta: dict):
    """The config dataclass of a checkpoint's metadata (JSON lists back to tuples: configs are hashable)."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    return _config_class(meta["family"])(**kw)


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
    have = backbone_fingerprint(target_params, cfg, t.get("backbone_layers")) if "backbone" in t else None
    if have is not None and not np.allclose(have, t["backbone"], rtol=5e-4):
        raise DrafterCheckpointError(
            f"drafter {path} was trained for {t['source']}, a backbone with the same embedding but other "
            "layers (a Medusa-2 fine-tuned backbone or its base): pass that target (--target "
            f"{t['source']}) or train a drafter for this one"
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
    p = pack_params(p, layout_of(target_params))
    if "layers" in shares:  # the target's decoder layers, already in its layout
        p["layers"] = target_params["layers"]
    return p


def load(path: os.PathLike, target_params, cfg: ModelConfig):
    """(drafter, runtime params) for a checkpoint folder, checked against the target."""
    meta, params = read(path)
    check_target(meta, target_params, cfg, path)
    config = make_config(meta)
    specs = accept_head.specs_from_meta(meta.get("accept") or {})  # (checked by read)
    if meta["family"] in MODEL_FAMILIES:
        drafter, dp = _model_drafter(config, target_params, cfg, path)
        if specs:
            drafter, dp = (
                dataclasses.replace(drafter, accept_heads=specs),
                {**dp, "accept": _to_jnp(params["accept"])},
            )
        return drafter, dp
    family = family_of(meta, config)
    params = {k: (v if k == "d2t" else _to_jnp(v)) for k, v in params.items()}
    drafter = family.drafter(config)
    if "target" in {f.name for f in dataclasses.fields(drafter)}:  # a drafter over the target's layers
        drafter = dataclasses.replace(drafter, target=cfg)
    fitted = _thresholds_for(meta, target_params, cfg)
    if fitted is not None:  # thresholds calibrated for this very target (S2D serving several)
        drafter = dataclasses.replace(drafter, thresholds=fitted)
    if specs:
        if "accept_heads" not in {f.name for f in dataclasses.fields(drafter)}:
            raise DrafterCheckpointError(
                f"{path}: the {family.name} drafter takes no acceptance heads, but drafter.json lists "
                f"{[s.key for s in specs]}; remove 'accept' and the accept.* arrays"
            )
        drafter = dataclasses.replace(drafter, accept_heads=specs)
    return drafter, bind(family, config, params, target_params)


def _thresholds_for(meta: dict, target_params, cfg: ModelConfig) -> tuple[float, ...] | None:
    """The thresholds drafter.json's "thresholds_for" records for this target (matched by its whole
    backbone's fingerprint), if any."""
    entries = meta.get("thresholds_for") or []
    if not entries:
        return None
    have = backbone_fingerprint(target_params, cfg)
    for e in entries:
        if np.allclose(have, e["backbone"], rtol=5e-4):
            return tuple(float(t) for t in e["thresholds"])
    return None


def save_layer_skip(path: os.PathLike, num_layers: int, target_params, cfg: ModelConfig, source: str
                    ) -> pathlib.Path:  # fmt: skip
    """Write the heads-only checkpoint of `layerskip:num_layers` for this target, without heads
    (`with_accept_heads` adds them)."""
    layer_skip(target_params, cfg, num_layers)  # refuses an impossible K now
    return save(path, "layerskip", LayerSkipConfig(num_layers), {}, target_info(target_params, cfg, source))


def _model_drafter(config, target_params, cfg: ModelConfig, path):
    """(drafter, params) of a heads-only checkpoint's drafter, built from the target."""
    try:
        return layer_skip(target_params, cfg, config.num_layers)
    except ValueError as e:
        raise DrafterCheckpointError(f"{path}: {e}") from None


def _to_jnp(tree):
    if isinstance(tree, dict):
        return {k: _to_jnp(v) for k, v in tree.items()}
    return jnp.asarray(tree, jnp.float32)

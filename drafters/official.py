"""Import official Medusa, EAGLE-1 / EAGLE-3 and DFlash checkpoints into specdec's drafters.

Formats (reference notes `drafters.md` §5.1-5.6, `frontier.md` §1.1): Medusa heads in
`official_medusa.py`, EAGLE-1 / EAGLE-3 in `official_eagle.py`, DFlash in `official_dflash.py`;
this module detects which one a folder holds and has the checks they share.

The reference code loads with `strict=False`, which hides missing tensors and wrong shapes; here
every tensor is checked and a `DrafterCheckpointError` names the tensor, the shape found and the
shape expected, or the target mismatch and its fix. `.bin` / `.pt` files are read without torch
(`specdec.checkpoints.tensor_files`: a restricted unpickler over the zip format; only tensors and
dicts are accepted, so no code from the file runs); the pre-1.6 legacy torch format needs torch.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import jax.numpy as jnp
import numpy as np

from specdec.checkpoints.tensor_files import Tensors, read_tensors
from specdec.drafters.checkpoint import DrafterCheckpointError
from specdec.models.config import ModelConfig

__all__ = ["is_official", "load_official", "read_tensors"]

MEDUSA_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
EAGLE_FILES = ("pytorch_model.bin", "model.safetensors")  # the reference loader's order


# ------------------------------------------------------------------------------------------------------------
# Detection


def folder_of(path) -> pathlib.Path:
    p = pathlib.Path(path).expanduser()
    return p.parent if p.is_file() else p


def read_config(folder: pathlib.Path, required: bool = True) -> dict:
    p = folder / "config.json"
    if not p.is_file():
        if required:
            raise DrafterCheckpointError(
                f"{folder} has no config.json: an official drafter checkpoint comes with "
                "one (copy it from the drafter's repository)"
            )
        return {}
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise DrafterCheckpointError(f"{p} is not valid JSON ({e}); re-download it") from None
    if not isinstance(d, dict):
        raise DrafterCheckpointError(f"{p} is not a JSON object")
    if isinstance(d.get("transformer_layer_config"), dict):  # vLLM speculators layout: the layer's config
        d = {
            **d["transformer_layer_config"],
            **{k: v for k, v in d.items() if k != "transformer_layer_config"},
        }
    return d


def eagle_file(folder: pathlib.Path) -> pathlib.Path | None:
    return next((folder / f for f in EAGLE_FILES if (folder / f).is_file()), None)


def is_official(path) -> str | None:
    """ "medusa" | "eagle" | "dflash" for a folder holding an official checkpoint, else None."""
    folder = folder_of(path)
    if not folder.is_dir() or (folder / "drafter.json").is_file():
        return None
    if any((folder / f).is_file() for f in MEDUSA_FILES):
        return "medusa"
    try:
        cfg = read_config(folder, required=False)
    except DrafterCheckpointError:
        return None
    if "medusa_num_heads" in cfg or cfg.get("model_type") == "medusa":
        return "medusa"  # a full Medusa-2 model or a vLLM Medusa file: load_official says why it is refused
    if isinstance(cfg.get("dflash_config"), dict) or any(
        "DFlash" in a for a in cfg.get("architectures") or []
    ):
        return "dflash"
    f = eagle_file(folder)
    if f is None or not cfg:
        return None
    try:
        return "eagle" if "fc.weight" in read_tensors(f) else None
    except DrafterCheckpointError:
        return None


# ------------------------------------------------------------------------------------------------------------
# Shared checks


def other_target(path, family: str, what: str, theirs, ours) -> DrafterCheckpointError:
    return DrafterCheckpointError(
        f"{path}: this {family} drafter was trained for another target ({what}={theirs}), but this target "
        f"has {what}={ours}; a drafter only works with the model it was trained on: use the {family} "
        "checkpoint published for this target, or train one with specdec-train"
    )


def checked_tensor(t: Tensors, name: str, shape: tuple[int, ...], why: str = "") -> np.ndarray:
    if name not in t:
        raise DrafterCheckpointError(
            f"{t.path} has no tensor {name!r} (expected shape {list(shape)}{why}); "
            "the file is incomplete or not this kind of checkpoint"
        )
    if tuple(t.shapes[name]) != tuple(shape):
        raise DrafterCheckpointError(
            f"{t.path}: tensor {name!r} has shape {list(t.shapes[name])}, expected {list(shape)}{why}"
        )
    return np.asarray(t.get(name), np.float32)


def warn_unused(t: Tensors, used: set[str], ignored=()) -> None:
    extra = sorted(k for k in t.shapes if k not in used and k not in ignored and not k.endswith("inv_freq"))
    if extra:
        warnings.warn(
            f"{t.path}: ignoring tensors this drafter has no use for: {extra[:8]}"
            f"{' …' if len(extra) > 8 else ''}",
            stacklevel=3,
        )


def to_f32(tree):
    if isinstance(tree, dict):
        return {k: to_f32(v) for k, v in tree.items()}
    return jnp.asarray(tree, jnp.float32)


# ------------------------------------------------------------------------------------------------------------
# Entry point


def load_official(path, target_params, target_cfg: ModelConfig):
    """(drafter, runtime params) for an official Medusa / EAGLE-1 / EAGLE-3 checkpoint folder.

    Checked against the target (hidden size, vocabulary) and tensor by tensor.
    """
    folder = folder_of(path)
    if not folder.is_dir():
        raise DrafterCheckpointError(f"{path} does not exist or is not a folder")
    kind = is_official(folder)
    # Imported here: both loaders use this module's checks.
    from specdec.drafters.official_eagle import load_eagle
    from specdec.drafters.official_medusa import load_medusa

    if kind == "medusa":
        return load_medusa(folder, target_params, target_cfg)
    if kind == "eagle":
        return load_eagle(folder, target_params, target_cfg)
    if kind == "dflash":
        from specdec.drafters.official_dflash import load_dflash

        return load_dflash(folder, target_params, target_cfg)
    have = sorted(p.name for p in folder.iterdir())[:12]
    raise DrafterCheckpointError(
        f"{folder} is not an official Medusa or EAGLE checkpoint (found {have}); expected config.json with "
        f"{' or '.join(MEDUSA_FILES)} (Medusa) or with {' or '.join(EAGLE_FILES)} holding fc.weight (EAGLE)"
    )

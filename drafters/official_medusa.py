"""Official Medusa-1 heads -> `Medusa` (see `official.py` for the checks all imports share).

Files: `medusa_lm_head.safetensors` or `medusa_lm_head.pt` + `config.json` (`medusa_num_heads`,
`medusa_num_layers`, optional `"version": "2"`). Head i is `{i}.0.linear.{weight [H, H], bias [H]}`
and its own LM head `{i}.1.weight [V, H]`; "version 2" files have no own head and share the
target's. Keys may carry a `medusa_head.` prefix. The head count and the head kind come from the
keys (the official 7B/13B/33B configs say 2 heads for files holding 5); a disagreeing config only
warns. Full Medusa-2 models (fine-tuned backbone) and `medusa_num_layers != 1` (one ResBlock
applied repeatedly) are refused.
"""

from __future__ import annotations

import pathlib
import re
import warnings

import numpy as np

from specdec.checkpoints.tensor_files import read_tensors
from specdec.drafters import checkpoint
from specdec.drafters.checkpoint import DrafterCheckpointError
from specdec.drafters.medusa import Medusa, MedusaConfig
from specdec.drafters.official import MEDUSA_FILES, checked_tensor, other_target, read_config, to_f32
from specdec.models.config import ModelConfig

_MEDUSA_KEY = re.compile(r"(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)")


def load_medusa(folder: pathlib.Path, target_params, tcfg: ModelConfig):
    """(Medusa drafter, runtime params) from an official Medusa-1 folder, checked against the target."""
    cfg = read_config(folder, required=False)
    f = next((folder / n for n in MEDUSA_FILES if (folder / n).is_file()), None)
    if cfg.get("model_type") == "medusa" and f is None:
        raise DrafterCheckpointError(
            f"{folder} is a vLLM-format Medusa checkpoint, which specdec does not import; "
            "use the original medusa_lm_head.safetensors / .pt release"
        )
    if f is None:
        raise DrafterCheckpointError(
            f"{folder} is a full Medusa-2 model (its config has medusa_num_heads but there is no "
            f"{' or '.join(MEDUSA_FILES)}): Medusa-2 fine-tunes the backbone, so its heads only work with "
            "that fine-tuned model, which specdec does not import; use a Medusa-1 heads checkpoint for this "
            "target"
        )
    t = read_tensors(f)
    if any(k.startswith("model.") or k == "lm_head.weight" for k in t.shapes):
        raise DrafterCheckpointError(
            f"{f} holds backbone weights (a full Medusa-2 model with a fine-tuned "
            "backbone), which specdec does not import; use a Medusa-1 heads "
            "checkpoint for this target"
        )
    names = {(k[len("medusa_head.") :] if k.startswith("medusa_head.") else k): k for k in t.shapes}
    t = t.renamed(names)
    bad = sorted(k for k in t.shapes if not _MEDUSA_KEY.fullmatch(k))
    if bad:
        raise DrafterCheckpointError(
            f"{f}: unexpected tensors {bad[:8]} in a Medusa heads file (expected "
            "{i}.0.linear.weight, {i}.0.linear.bias, {i}.1.weight)"
        )
    heads = sorted({int(_MEDUSA_KEY.fullmatch(k).group(1)) for k in t.shapes})
    k = len(heads)
    if not k or heads != list(range(k)):
        raise DrafterCheckpointError(f"{f}: Medusa heads are numbered {heads}, expected 0..K-1")
    if cfg.get("medusa_num_layers", 1) != 1 or any(f"{i}.1.linear.weight" in t for i in heads):
        raise DrafterCheckpointError(
            f"{folder}: medusa_num_layers={cfg.get('medusa_num_layers', 1)}: each head applies one ResBlock "
            "several times (shared weights), and specdec's Medusa has one ResBlock per head; only "
            "medusa_num_layers=1 checkpoints (all official ones) are supported"
        )
    said = cfg.get("medusa_num_heads", cfg.get("num_heads"))
    if said is not None and said != k:
        warnings.warn(
            f"{folder}: config.json says medusa_num_heads={said}, but {f.name} holds {k} heads; "
            f"using the {k} heads in the file",
            stacklevel=3,
        )
    own = [f"{i}.1.weight" in t for i in heads]
    if any(own) and not all(own):
        raise DrafterCheckpointError(
            f"{f}: only heads {[i for i in heads if own[i]]} have their own LM head "
            "({i}.1.weight); a Medusa file has it for every head or for none"
        )
    own_heads = all(own)
    v2 = str(cfg.get("version", "1")) == "2"
    if v2 == own_heads:
        warnings.warn(
            f"{folder}: config.json says version={cfg.get('version', '1')!r}, but the heads "
            f"{'have' if own_heads else 'lack'} their own LM head; going by the file",
            stacklevel=3,
        )
    d = t.shapes.get("0.0.linear.weight", (tcfg.hidden_size,))[-1]
    if d != tcfg.hidden_size:
        raise other_target(folder, "Medusa", "hidden_size", d, tcfg.hidden_size)
    if own_heads and t.shapes["0.1.weight"][0] != tcfg.vocab_size:
        raise other_target(folder, "Medusa", "vocab_size", t.shapes["0.1.weight"][0], tcfg.vocab_size)
    why = f" (hidden_size {d}, vocab_size {tcfg.vocab_size})"
    p = {
        "w": np.stack([checked_tensor(t, f"{i}.0.linear.weight", (d, d), why).T for i in heads]),
        "b": np.stack([checked_tensor(t, f"{i}.0.linear.bias", (d,), why) for i in heads]),
    }
    if own_heads:
        p["heads"] = np.stack(
            [checked_tensor(t, f"{i}.1.weight", (tcfg.vocab_size, d), why).T for i in heads]
        )
    config = MedusaConfig(k, d, tcfg.vocab_size, tcfg.vocab_size, own_heads, tap=tcfg.num_layers)
    return Medusa(config), checkpoint.bind("medusa", config, to_f32(p), target_params)

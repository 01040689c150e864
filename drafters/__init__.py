"""Drafters: one file per family; the protocol lives in `protocol.py`.

`parse_drafter` turns a CLI string into (drafter, draft params):
  "ngram" | "ngram:n=3"      prompt lookup, matching suffixes of up to n tokens (adaptive=0: draft
                             even without a match instead of taking a plain AR step)
  "layerskip:K"              the target's first K layers + its final norm and head (no training)
  PATH                       an independent draft model (HF folder or .gguf sharing the tokenizer)
"""

from __future__ import annotations

from specdec.drafters.draft_model import DraftModel, layer_skip
from specdec.drafters.ngram import NGram
from specdec.drafters.protocol import Context, Drafter

__all__ = ["Context", "DraftModel", "Drafter", "NGram", "layer_skip", "parse_drafter"]


def _kv(arg: str) -> dict[str, int]:
    out = {}
    for part in filter(None, arg.split(",")):
        k, sep, v = part.partition("=")
        if not sep or not v.strip().isdigit():
            raise ValueError(f"expected key=integer, got {part!r}")
        out[k.strip()] = int(v)
    return out


def parse_drafter(spec: str, target_params, target_cfg, *, max_depth: int, dtype: str | None = None):
    """(drafter, draft_params) for a CLI string; `max_depth` is the tree builder's depth."""
    kind, _, arg = spec.partition(":")
    if kind == "ngram":
        try:
            kw = _kv(arg)
        except ValueError as e:
            raise ValueError(f"--drafter {spec!r}: {e}; use ngram or ngram:n=3") from None
        n, adaptive = kw.pop("n", 3), bool(kw.pop("adaptive", 1))
        if kw:
            raise ValueError(f"--drafter {spec!r}: unknown option(s) {sorted(kw)}; use ngram:n=3,adaptive=1")
        return NGram(target_cfg.vocab_size, max_depth=max(max_depth, 1), max_n=n, adaptive=adaptive), None
    if kind == "layerskip":
        if not arg.isdigit():
            raise ValueError(f"--drafter {spec!r}: use layerskip:K with K the number of target layers kept")
        return layer_skip(target_params, target_cfg, int(arg))
    from specdec.loading import CheckpointError, load_model
    from specdec.models import to_device

    try:
        m = load_model(spec, dtype=dtype or target_cfg.dtype)
    except CheckpointError as e:
        raise ValueError(
            f"--drafter {spec!r} is not ngram[:n=N], layerskip:K or a loadable draft model: {e}"
        ) from None
    if m.cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(
            f"draft model {spec!r} has a vocabulary of {m.cfg.vocab_size} tokens, the target "
            f"{target_cfg.vocab_size}; a draft model must share the target's tokenizer"
        )
    return DraftModel(m.cfg), to_device(m.params, m.cfg)

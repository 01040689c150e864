"""Drafters: one file per family; the protocol lives in `protocol.py`.

`parse_drafter` turns a CLI string into (drafter, draft params):
  "ngram" | "ngram:n=3"      prompt lookup, matching suffixes of up to n tokens (min=2: of at least
                             2; adaptive=0: draft even without a match instead of taking a plain
                             AR step)
  "rest:DATASTORE[,len=L]"   REST: the best continuation of the longest suffix found in a
                             datastore built by specdec-datastore (`specdec.drafters.rest`)
  "rag:MODEL[,budget=1024,chunk=128]"   RAPID's RAG drafter: MODEL (target, layerskip:K or a
                             draft model path) reading the long prompt's document shortened to
                             the BM25-best chunks within `budget` tokens (`specdec.drafters.rag`)
  "layerskip:K"              the target's first K layers + its final norm and head (no training);
                             on the embedded target, `layerskip:6` carries shipped SpecDec++
                             acceptance heads (`specdec/data/drafters/layerskip-6`)
  "medusa" | "eagle" | "eagle3" | "amphista" | "falcon" | "dflash"
                             the trained drafters shipped for the embedded target
                             (SmolLM2-135M-Instruct; the families of `specdec.drafters.family`
                             with `shipped`); other targets: train one with specdec-train;
                             "eagle:conf=0.5": EAGLE drafts only when its top-1 probability at
                             the root reaches 0.5, else the loop takes a plain AR step;
                             "dflash:block=4": DFlash drafts blocks of 4 positions (cheaper
                             forwards for shallow trees; trained with 16)
  "MODEL+SOURCE[+SOURCE]"    MODEL's tree with retrieval candidates fused in (RASD; `Fused`,
                             `specdec.trees.fused`): MODEL is any spec above, a SOURCE is
                             "ngram[:n=3,paths=2,len=4]" (prompt lookup: up to `paths`
                             continuations of `len` tokens, default len = max(tree depth, 4))
                             or "rest:DATASTORE[,paths=2,len=4]" (a REST datastore built by
                             specdec-datastore); e.g. eagle+ngram, eagle+ngram+rest:ds.npz
  PATH                       a specdec-train drafter folder (drafter.json), an official Medusa /
                             EAGLE-1 / EAGLE-3 checkpoint folder, or an independent draft model
                             (HF folder or .gguf sharing the tokenizer)
"""

from __future__ import annotations

import importlib.resources
import pathlib

from specdec.context import Context
from specdec.drafter import Drafter
from specdec.drafters.draft_model import DraftModel, layer_skip
from specdec.drafters.ngram import NGram

__all__ = ["Context", "DraftModel", "Drafter", "NGram", "layer_skip", "parse_drafter"]


def _kv(arg: str) -> dict[str, int]:
    out = {}
    for part in filter(None, arg.split(",")):
        k, sep, v = part.partition("=")
        if not sep or not v.strip().isdigit():
            raise ValueError(f"expected key=integer, got {part!r}")
        out[k.strip()] = int(v)
    return out


def _inference_options(spec: str, family, arg: str) -> dict:
    """The options of a shipped name, `eagle:conf=0.5`, `dflash:block=4` (the family's `inference`),
    parsed: option name -> value."""
    from specdec.drafters.family import FAMILIES

    out = {}
    for part in filter(None, arg.split(",")):
        name, _, value = part.partition("=")
        opt = family.inference.get(name)
        if opt is None:
            owners: dict[str, list[str]] = {}
            for f in FAMILIES.values():
                for n in f.inference:
                    owners.setdefault(n, []).append(f.name)
            known = ", ".join(f"{n}= {'is ' * (i == 0)}for {' and '.join(fs)}"
                              for i, (n, fs) in enumerate(owners.items()))  # fmt: skip
            raise ValueError(f"--drafter {spec!r}: {family.name} takes no option {name}= ({known})")
        try:
            out[name] = opt.parse(value)
        except ValueError:
            raise ValueError(f"--drafter {spec!r}: use {opt.usage.format(name=family.name)}") from None
    return out


def shipped_names() -> list[str]:
    """The trained families whose drafter ships for the embedded target (`--drafter eagle`)."""
    from specdec.drafters.family import FAMILIES

    return [name for name, f in FAMILIES.items() if f.shipped]


def shipped_path(name: str) -> pathlib.Path:
    """The folder of a drafter shipped with the package (trained for SmolLM2-135M-Instruct)."""
    return pathlib.Path(str(importlib.resources.files("specdec") / "data" / "drafters" / name))


def _layer_skip_with_heads(k: int, target_params, target_cfg):
    """`layerskip:k` with the acceptance heads shipped for it when they were trained for this
    target (the embedded one); else without heads."""
    from specdec.drafters import checkpoint

    path = shipped_path(f"layerskip-{k}")
    if checkpoint.is_checkpoint(path):
        try:
            checkpoint.check_target(checkpoint.read(path)[0], target_params, target_cfg, path)
        except checkpoint.DrafterCheckpointError:
            pass  # another target: its layer-skip drafter has no heads
        else:
            return checkpoint.load(path, target_params, target_cfg)
    return layer_skip(target_params, target_cfg, k)


def _ngram(spec: str, arg: str, vocab_size: int, max_depth: int, *, source: bool = False) -> NGram:
    """`ngram[:n=N,min=M,adaptive=0]`; as a retrieval source also `paths=R,len=L`."""
    usage = "ngram:n=3,min=1" + (",paths=2,len=4" if source else "")
    try:
        kw = _kv(arg)
    except ValueError as e:
        raise ValueError(f"--drafter {spec!r}: {e}; use {usage}") from None
    n, adaptive, min_n = kw.pop("n", 3), bool(kw.pop("adaptive", 1)), kw.pop("min", 1)
    depth, paths = max(max_depth, 1), 2
    if source:
        depth, paths = kw.pop("len", max(max_depth, 4)), kw.pop("paths", 2)
    if kw:
        raise ValueError(f"--drafter {spec!r}: unknown option(s) {sorted(kw)}; use {usage}")
    if not 1 <= min_n <= n:
        raise ValueError(f"--drafter {spec!r}: need 1 <= min <= n; use e.g. ngram:n=3,min=2")
    if depth < 1 or paths < 1:
        raise ValueError(f"--drafter {spec!r}: need paths >= 1 and len >= 1; use {usage}")
    return NGram(vocab_size, max_depth=depth, max_n=n, min_n=min_n, adaptive=adaptive, paths=paths)


def _fused(spec: str, target_params, target_cfg, *, max_depth: int, dtype: str | None):
    """`MODEL+SOURCE[+SOURCE...]`: a model drafter fused with retrieval sources (`Fused`)."""
    from specdec.drafters.fused import Fused

    model_spec, *source_specs = spec.split("+")
    drafter, params = parse_drafter(model_spec, target_params, target_cfg, max_depth=max_depth, dtype=dtype)
    sources, source_params = [], []
    for part in source_specs:
        kind, _, arg = part.partition(":")
        if kind == "ngram":
            sources.append(_ngram(spec, arg, target_cfg.vocab_size, max_depth, source=True))
            source_params.append(None)
        elif kind == "rest":
            from specdec.drafters.rest import load_rest

            src, p = load_rest(spec, arg, target_cfg, max_depth=max_depth)
            sources.append(src)
            source_params.append(p)
        else:
            raise ValueError(
                f"--drafter {spec!r}: {part!r} is not a retrieval source; after MODEL+ come "
                "ngram[:n=3,paths=2,len=4] or rest:DATASTORE[,paths=2,len=4] (e.g. eagle+ngram)"
            )
    return Fused(drafter, tuple(sources)), (params, tuple(source_params))


def _rag(spec: str, arg: str, target_params, target_cfg, *, max_depth: int, dtype: str | None):
    """`rag:MODEL[,budget=N,chunk=N]`: RAPID's RAG drafter over `MODEL` (target, layerskip:K or a
    draft model's path), reading a shortened context of `budget` tokens (`specdec.drafters.rag`)."""
    from specdec.drafters.rag import RagDraft

    model, *opts = arg.split(",")
    try:
        kw = _kv(",".join(opts))
    except ValueError as e:
        raise ValueError(f"--drafter {spec!r}: {e}; use rag:layerskip:6,budget=1024,chunk=128") from None
    if set(kw) - {"budget", "chunk"} or not all(v > 0 for v in kw.values()):
        raise ValueError(f"--drafter {spec!r}: options are budget= and chunk= (positive token counts)")
    if model == "target":  # self-speculation: the target's arrays, a cache of its own
        cfg, params = target_cfg, target_params
    else:
        d, params = parse_drafter(model, target_params, target_cfg, max_depth=max_depth, dtype=dtype)
        if not isinstance(d, DraftModel):
            raise ValueError(f"--drafter {spec!r}: a RAG drafter runs a draft model (target, layerskip:K "
                             f"or a model path), not {type(d).__name__}")  # fmt: skip
        cfg = d.cfg
    return RagDraft(cfg, **kw), {"model": params}


def parse_drafter(spec: str, target_params, target_cfg, *, max_depth: int, dtype: str | None = None):
    """(drafter, draft_params) for a CLI string; `max_depth` is the tree builder's (n-gram lookup
    proposes that many tokens). Drafters size their per-node state from the builder when the loop
    starts (`specdec.drafter`), so nothing else of the tree is needed here."""
    if "+" in spec and not pathlib.Path(spec).exists():
        return _fused(spec, target_params, target_cfg, max_depth=max_depth, dtype=dtype)
    kind, _, arg = spec.partition(":")
    if kind == "ngram":
        return _ngram(spec, arg, target_cfg.vocab_size, max_depth), None
    if kind == "rag":
        return _rag(spec, arg, target_params, target_cfg, max_depth=max_depth, dtype=dtype)
    if kind == "rest":
        from specdec.drafters.rest import load_rest

        return load_rest(spec, arg, target_cfg, max_depth=max(max_depth, 1), standalone=True)
    if kind == "layerskip":
        if not arg.isdigit():
            raise ValueError(f"--drafter {spec!r}: use layerskip:K with K the number of target layers kept")
        return _layer_skip_with_heads(int(arg), target_params, target_cfg)
    from specdec.drafters import checkpoint, official
    from specdec.drafters.family import FAMILIES

    family = FAMILIES.get(kind)
    if family is not None:  # a trained family's name: the drafter shipped for the embedded target
        options = _inference_options(spec, family, arg)
        path = shipped_path(kind)
        if not family.shipped:
            raise ValueError(
                f"--drafter {kind}: no {kind} checkpoint ships with this version; train one with "
                f"`specdec-train --drafter {kind} --out RUN` and pass RUN/drafter as --drafter"
            )
        if not checkpoint.is_checkpoint(path):
            raise ValueError(f"--drafter {kind}: the shipped drafter {path} is missing; reinstall specdec")
        try:
            d, dp = checkpoint.load(path, target_params, target_cfg)
        except checkpoint.DrafterCheckpointError as e:
            raise ValueError(
                f"--drafter {kind} is a shipped drafter and does not fit this target ({e}). Train one with "
                f"`specdec-train --drafter {kind} --target ...` and pass its folder (RUN/drafter) as "
                "--drafter"
            ) from None
        for name, value in options.items():
            d = family.inference[name].apply(d, value)
        return d, dp
    if checkpoint.is_checkpoint(spec):
        return checkpoint.load(spec, target_params, target_cfg)
    if official.is_official(spec):
        return official.load_official(spec, target_params, target_cfg)
    from specdec.loading import CheckpointError, load_model
    from specdec.models import to_device

    try:
        m = load_model(spec, dtype=dtype or target_cfg.dtype)
    except CheckpointError as e:
        raise ValueError(
            f"--drafter {spec!r} is not ngram[:n=N], layerskip:K, {', '.join(shipped_names())}, a drafter "
            f"checkpoint folder or a loadable draft model: {e}"
        ) from None
    if m.cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(
            f"draft model {spec!r} has a vocabulary of {m.cfg.vocab_size} tokens, the target "
            f"{target_cfg.vocab_size}; a draft model must share the target's tokenizer"
        )
    return DraftModel(m.cfg), to_device(m.params, m.cfg)

"""A regenerated set in its compact, committable form, grown run by run, and reading one back.

    dest/manifest.json          settings (target, taps, sampling, seed, data) + one entry per part
    dest/<part>/conversations.jsonl.gz   ShareGPT records with per-turn finish reasons (valid `--data`)
    dest/<part>/tokens.npz      the exact token ids and loss mask the features were computed on

A part is what one `regenerate` run wrote (`export(run_dir, dest)`, repeated as the run goes; only
that run's part is rewritten). A run on a new machine given the same `dest` skips the conversations
its parts hold (`exported_indices`), so a regeneration spread over sessions whose feature caches are
lost still ends with every conversation regenerated once. `load_exported(dest)` returns all parts'
sequences in conversation order as training `Example`s: `features.extract` rebuilds the features.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil

import numpy as np

from specdec.train.data import ROLES, Example
from specdec.train.features import FeatureCacheError, _read_manifest

_COST = ("tokens", "seconds", "tokens_per_s", "bytes")  # per-run fields, not settings


def conversations(out_dir: os.PathLike) -> list[list[dict[str, str]]]:
    """The regenerated conversations of a (possibly partial) run, in input order."""
    recs = []
    for d in sorted(pathlib.Path(out_dir).glob("shard_*")):
        for line in (d / "conversations.jsonl").read_text(encoding="utf-8").splitlines():
            recs.append(json.loads(line))
    recs.sort(key=lambda r: r["index"])
    return [[{"role": ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]] for r in recs]


def settings(m: dict) -> dict:
    """What makes two runs parts of one set: target, taps, conversation count and regeneration settings."""
    regen = {k: v for k, v in m["regenerated"].items() if k not in _COST}
    target = dict(m["target"])
    if isinstance(target.get("source"), str):  # the file, not where this machine installed it
        target["source"] = pathlib.Path(target["source"]).name
    return {"target": target, "taps": m["taps"], "num_examples": m["num_examples"], "regenerated": regen}


def read(dest: os.PathLike) -> dict | None:
    """`dest`'s manifest, or None when there is no exported set there."""
    f = pathlib.Path(dest) / "manifest.json"
    return json.loads(f.read_text()) if f.is_file() else None


def check(dest: os.PathLike, m: dict) -> None:
    """Raise `FeatureCacheError` when the set in `dest` was made with other settings than run manifest `m`."""
    have = read(dest)
    if have is not None and have["settings"] != settings(m):
        diff = {
            k: (have["settings"].get(k), v) for k, v in settings(m).items() if have["settings"].get(k) != v
        }
        raise FeatureCacheError(
            f"{dest} holds a regenerated set made with other settings (set vs run: {diff}); export to "
            "another folder or regenerate with the set's settings"
        )


def exported_indices(dest: os.PathLike, *, but: str | None = None) -> set[int]:
    """Conversation indices held by `dest`'s parts (except part `but`, the caller's own)."""
    have = read(dest)
    names = [] if have is None else [n for n in have["parts"] if n != but]
    return {int(i) for n in names for i in np.load(pathlib.Path(dest) / n / "tokens.npz")["conv_index"]}


def export(out_dir: os.PathLike, dest: os.PathLike) -> pathlib.Path:
    """Write (or rewrite) run `out_dir`'s part of the set in `dest`: its finished shards' text and ids.

    The run's part is named by its `run_id`; other parts are left as they are. The manifest lists
    every part's size and cost (tokens, seconds of regeneration); its conversations are the
    `conv_index` of its `tokens.npz`."""
    src, dest = pathlib.Path(out_dir), pathlib.Path(dest)
    m = _read_manifest(src)
    check(dest, m)
    name = f"part-{m.get('run_id', 'run')}"
    recs, toks, masks, idx = [], [], [], []
    for sh in sorted(m["shards"], key=lambda s: s["index"]):
        d = src / sh["name"]
        recs += [json.loads(line) for line in (d / "conversations.jsonl").read_text("utf-8").splitlines()]
        o = np.load(d / "offsets.npy")
        t, lm = np.load(d / "tokens.npy"), np.load(d / "loss_mask.npy")
        toks += [t[o[i] : o[i + 1]] for i in range(len(o) - 1)]
        masks += [lm[o[i] : o[i + 1]] for i in range(len(o) - 1)]
        idx += np.load(d / "conv_index.npy").tolist()
    order = np.argsort(idx, kind="stable")
    recs.sort(key=lambda r: r["index"])
    tmp = dest / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    with gzip.open(tmp / "conversations.jsonl.gz", "wt", encoding="utf-8") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    toks, masks = [toks[i] for i in order], [masks[i] for i in order]
    flat = np.concatenate(toks) if toks else np.zeros(0, np.int32)
    np.savez_compressed(
        tmp / "tokens.npz", tokens=flat.astype(np.uint16 if flat.max(initial=0) < 65536 else np.int32),
        loss_mask=np.packbits(np.concatenate(masks)) if masks else np.zeros(0, np.uint8),
        offsets=np.cumsum([0] + [len(t) for t in toks]).astype(np.int64),
        conv_index=np.asarray(idx, np.int64)[order],
    )  # fmt: skip
    shutil.rmtree(dest / name, ignore_errors=True)
    os.replace(tmp, dest / name)
    have = read(dest) or {"settings": settings(m), "parts": {}}
    have["parts"][name] = {
        "sequences": len(toks), "tokens": int(len(flat)),
        "seconds": round(sum(sh.get("seconds", 0.0) for sh in m["shards"]), 1),
        "complete": bool(m["complete"]),
    }  # fmt: skip
    parts = have["parts"].values()
    n, secs = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
    have["total"] = {"sequences": sum(p["sequences"] for p in parts), "tokens": n, "seconds": round(secs, 1),
                     "tokens_per_s": round(n / max(secs, 1e-9), 1)}  # fmt: skip
    tmp_m = dest / ".manifest.json.tmp"
    tmp_m.write_text(json.dumps(have, indent=1))
    os.replace(tmp_m, dest / "manifest.json")
    return dest


def load_exported(dest: os.PathLike) -> list[Example]:
    """Every part's exact token sequences, in conversation order (for `features.extract`)."""
    dest, have = pathlib.Path(dest), read(dest)
    if have is None:
        raise FeatureCacheError(
            f"{dest} holds no exported regenerated set (no manifest.json); check the path"
        )
    out = []
    for name in sorted(have["parts"]):
        z = np.load(dest / name / "tokens.npz")
        o, t, ci = z["offsets"], z["tokens"].astype(np.int32), z["conv_index"]
        mask = np.unpackbits(z["loss_mask"])[: len(t)].astype(bool)
        out += [(int(ci[i]), Example(t[o[i] : o[i + 1]], mask[o[i] : o[i + 1]])) for i in range(len(o) - 1)]
    out.sort(key=lambda e: e[0])
    return [e for _, e in out]

"""A regenerated set in its compact, committable form, and reading one back.

`export(run_dir, dest)` gathers a finished (or partial) `regenerate` run into `dest/`:
`conversations.jsonl.gz` (ShareGPT records with per-turn finish reasons, valid `--data`),
`tokens.npz` (the exact token ids and loss mask the features were computed on, conversation index)
and `manifest.json` (settings and cost). `load_exported(dest)` returns those sequences as training
`Example`s, so a new machine rebuilds the features with `features.extract` instead of regenerating.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib

import numpy as np

from specdec.train.data import ROLES, Example
from specdec.train.features import _read_manifest


def conversations(out_dir: os.PathLike) -> list[list[dict[str, str]]]:
    """The regenerated conversations of a (possibly partial) run, in input order."""
    recs = []
    for d in sorted(pathlib.Path(out_dir).glob("shard_*")):
        for line in (d / "conversations.jsonl").read_text(encoding="utf-8").splitlines():
            recs.append(json.loads(line))
    recs.sort(key=lambda r: r["index"])
    return [[{"role": ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]] for r in recs]


def export(out_dir: os.PathLike, dest: os.PathLike) -> pathlib.Path:
    """Write the run's text and token ids compactly to `dest` (for the repository).

    `dest/conversations.jsonl.gz` (ShareGPT records, valid `--data`), `dest/tokens.npz` (uint16/
    int32 ids, loss mask, offsets, conversation index: exactly the sequences the features were
    computed on) and `dest/manifest.json` (the run's settings and cost, no shard list).
    """
    src, dest = pathlib.Path(out_dir), pathlib.Path(dest)
    m = _read_manifest(src)
    dest.mkdir(parents=True, exist_ok=True)
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
    with gzip.open(dest / "conversations.jsonl.gz", "wt", encoding="utf-8") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    toks, masks = [toks[i] for i in order], [masks[i] for i in order]
    flat = np.concatenate(toks) if toks else np.zeros(0, np.int32)
    np.savez_compressed(
        dest / "tokens.npz", tokens=flat.astype(np.uint16 if flat.max(initial=0) < 65536 else np.int32),
        loss_mask=np.packbits(np.concatenate(masks)) if masks else np.zeros(0, np.uint8),
        offsets=np.cumsum([0] + [len(t) for t in toks]).astype(np.int64),
        conv_index=np.asarray(idx, np.int64)[order],
    )  # fmt: skip
    keep = {k: v for k, v in m.items() if k != "shards"}
    keep["sequences"] = len(toks)
    (dest / "manifest.json").write_text(json.dumps(keep, indent=1))
    return dest


def load_exported(dest: os.PathLike) -> list[Example]:
    """The exact token sequences of an exported run (to re-extract features with `features.extract`)."""
    z = np.load(pathlib.Path(dest) / "tokens.npz")
    o, t = z["offsets"], z["tokens"].astype(np.int32)
    mask = np.unpackbits(z["loss_mask"])[: len(t)].astype(bool)
    return [Example(t[o[i] : o[i + 1]], mask[o[i] : o[i + 1]]) for i in range(len(o) - 1)]

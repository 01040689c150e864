"""Target features cached to disk once: memory-mapped shards, a manifest, resumable extraction.

On a CPU the frozen target's forward (~300 tok/s for SmolLM2-135M) dominates drafter training, so
features are extracted once and every drafter trains from the cache. Layout of `out_dir`:

    manifest.json          target source + config, taps, max_len, shards done, completion flag
    shard_00000/
      tokens.npy           int32 [N]      the shard's sequences, concatenated
      loss_mask.npy        bool  [N]      assistant tokens (prediction targets)
      offsets.npy          int64 [S + 1]  sequence s is [offsets[s], offsets[s+1])
      top1.npy             int32 [N]      the target's argmax next token after each position (-1 where
                                          not computed: regenerated prompt positions predict no label)
      tap_{i}.npy          f16   [N, D]   hidden tap i (HF numbering; i = L is the final normed state)

A shard is written to a temporary folder and renamed, then recorded in the manifest, so an
interrupted extraction resumes at the first missing shard and never reads a half-written one.
Several processes may fill one cache (`worker=(i, n)`: shard s is worker s mod n's; one process per
core beats one process on all cores, whose XLA threads share small matmuls badly); the manifest is
read and updated under a file lock, and the last worker to finish marks the cache complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from specdec.cache import causal_mask
from specdec.matmul import cast_dense
from specdec.models.config import ModelConfig
from specdec.models.llama import forward
from specdec.sampling import argmax
from specdec.train.data import Example

MANIFEST = "manifest.json"


def default_taps(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low/mid/high layers (2, L//2, L-3) and the final normed state (L)."""
    return (2, num_layers // 2, num_layers - 3, num_layers)


class FeatureCacheError(ValueError):
    """A feature cache that does not fit the run; the message names the fix."""


def _target_id(source: str, cfg: ModelConfig) -> dict:
    return {"source": str(source), "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "num_layers": cfg.num_layers}  # fmt: skip


def _read_manifest(out: pathlib.Path) -> dict | None:
    p = out / MANIFEST
    return json.loads(p.read_text()) if p.exists() else None


def _write_manifest(out: pathlib.Path, m: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=1))
    os.replace(tmp, out / MANIFEST)


@contextlib.contextmanager
def _locked(out: pathlib.Path):
    """Exclusive access to `out`'s manifest across processes (extraction workers)."""
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _batches(examples: Sequence[Example], tokens_per_batch: int, quantum: int = 64):
    """Group by length (padded up to a multiple of `quantum`): few shapes, little padding."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    i = 0
    while i < len(order):
        t = -(-len(examples[order[i]].tokens) // quantum) * quantum
        group = [j for j in order[i:] if len(examples[j].tokens) <= t][: max(1, tokens_per_batch // t)]
        yield group, t
        i += len(group)


def reusable(caches: Sequence[os.PathLike], source: str, cfg: ModelConfig, taps: tuple[int, ...],
             matmul_dtype: str) -> dict[bytes, tuple[FeatureSet, int]]:  # fmt: skip
    """Sequences of other caches of the same target, taps and precision, by their token ids.

    A regeneration run's cache holds the features of the conversations it wrote (from the generating
    forwards); an extraction of the exported set copies them instead of running the target again.
    The file name of the target's source identifies it (the set travels between machines).
    """
    want = _target_id(pathlib.Path(str(source)).name, cfg)
    found: dict[bytes, tuple[FeatureSet, int]] = {}
    for c in caches:
        fs = FeatureSet.open(c, allow_partial=True)
        m = fs.manifest
        have = {**m["target"], "source": pathlib.Path(m["target"]["source"]).name}
        dt, missing = m.get("matmul_dtype", "float32"), sorted(set(taps) - set(m["taps"]))
        checks = [(have != want, f"target {have} vs {want}"), (missing, f"taps {m['taps']} lack {missing}"),
                  (dt != matmul_dtype, f"matmul_dtype {dt} vs {matmul_dtype}")]  # fmt: skip
        for bad, why in checks:
            if bad:
                raise FeatureCacheError(f"--reuse_features {c} does not fit this extraction ({why}); drop it")
        for s in range(len(fs)):
            found.setdefault(fs.seq(s, ["tokens"])["tokens"].tobytes(), (fs, s))
    return found


def extract(
    params,
    cfg: ModelConfig,
    source: str,
    examples: Sequence[Example],
    out_dir: os.PathLike,
    *,
    taps: tuple[int, ...],
    shard_size: int = 64,
    tokens_per_batch: int = 2048,
    matmul_dtype: str = "float32",
    reuse: Sequence[os.PathLike] = (),
    progress: bool = True,
    worker: tuple[int, int] = (0, 1),
) -> pathlib.Path:
    """Run the target over `examples` and cache `taps` + argmax ids; resumes an interrupted run.

    `matmul_dtype="bfloat16"` runs the target's products in bf16 (f32 accumulation, residual stream
    and attention; `specdec.matmul.cast_dense`): 1.6x faster on a Zen 4 core, labels = the f32
    argmax at ~99% of positions. `reuse`: caches (e.g. of `--regenerate` runs) whose sequences with
    the same tokens and loss mask are copied, not recomputed (see `reusable`). Raises
    `FeatureCacheError` if `out_dir` holds a cache for another target, other taps or another matmul
    dtype, or a `reuse` cache does not fit. `worker=(i, n)`: this process extracts shards s with
    s mod n = i (start n processes on one `out_dir`); the manifest says `complete` once all are in.
    """
    w, n_workers = worker
    if not 0 <= w < n_workers:
        raise FeatureCacheError(f"extraction worker {w}/{n_workers}: the index must be in 0..{n_workers - 1}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    want = {"target": _target_id(source, cfg), "taps": list(taps), "num_examples": len(examples),
            "matmul_dtype": matmul_dtype}  # fmt: skip
    with _locked(out):
        m = _read_manifest(out)
        if m is None:
            m = {**want, "dtype": "float16", "shards": [], "complete": False}
            _write_manifest(out, m)
    m.setdefault("matmul_dtype", "float32")  # caches written before the option ran in float32
    if any(m[k] != v for k, v in want.items()):
        diff = {k: (m[k], v) for k, v in want.items() if m[k] != v}
        raise FeatureCacheError(
            f"{out} holds features of a different extraction (cached vs requested: {diff}); "
            "use another --features directory or delete this one"
        )

    if matmul_dtype != "float32":
        params = cast_dense(params, matmul_dtype)

    @jax.jit
    def run(params, tokens):
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        logits, hs, _ = forward(params, cfg, tokens, pos, None, causal_mask(b, t), taps=taps)
        return argmax(logits), tuple(h.astype(jnp.float16) for h in hs)

    found = reusable(reuse, source, cfg, taps, matmul_dtype) if reuse else {}
    n_shards = -(-len(examples) // shard_size)
    mine = range(w, n_shards, n_workers)
    done = {s["index"] for s in m["shards"]}
    total = sum(len(e.tokens) for si in mine for e in examples[si * shard_size : (si + 1) * shard_size])
    desc = "features" if n_workers == 1 else f"features {w}/{n_workers}"
    bar = tqdm(total=total, unit="tok", desc=desc, disable=not progress, smoothing=0.05)
    bar.update(sum(s["tokens"] for s in m["shards"] if s["index"] % n_workers == w))
    for si in mine:
        if si in done:
            continue
        exs = examples[si * shard_size : (si + 1) * shard_size]
        top1 = [None] * len(exs)
        feats = [None] * len(exs)
        for j, e in enumerate(exs):
            fs, k = found.get(np.asarray(e.tokens, np.int32).tobytes(), (None, 0))
            d = fs.seq(k, ["loss_mask", "top1", *(f"tap_{t}" for t in taps)]) if fs else None
            if d is not None and np.array_equal(d["loss_mask"], e.loss_mask):
                top1[j], feats[j] = np.asarray(d["top1"]), [np.asarray(d[f"tap_{t}"]) for t in taps]
                bar.update(len(e.tokens))
        todo = [j for j in range(len(exs)) if top1[j] is None]
        for group, t in _batches([exs[j] for j in todo], tokens_per_batch):
            group = [todo[g] for g in group]
            batch = np.zeros((len(group), t), np.int32)
            for r, j in enumerate(group):
                batch[r, : len(exs[j].tokens)] = exs[j].tokens
            ids, hs = jax.device_get(run(params, jnp.asarray(batch)))
            for r, j in enumerate(group):
                n = len(exs[j].tokens)
                top1[j] = ids[r, :n]
                feats[j] = [h[r, :n] for h in hs]
                bar.update(n)
        tmp, final = out / f".shard_{si:05d}.tmp", out / f"shard_{si:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.save(tmp / "tokens.npy", np.concatenate([e.tokens for e in exs]).astype(np.int32))
        np.save(tmp / "loss_mask.npy", np.concatenate([e.loss_mask for e in exs]))
        np.save(tmp / "offsets.npy", np.cumsum([0] + [len(e.tokens) for e in exs]).astype(np.int64))
        np.save(tmp / "top1.npy", np.concatenate(top1))
        for k, tap in enumerate(taps):
            np.save(tmp / f"tap_{tap}.npy", np.concatenate([f[k] for f in feats]))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with _locked(out):  # other workers append their shards to the same manifest
            m = _read_manifest(out)
            m["shards"].append({"index": si, "name": final.name, "sequences": len(exs),
                                "tokens": int(sum(len(e.tokens) for e in exs)),
                                "reused": len(exs) - len(todo)})  # fmt: skip
            _write_manifest(out, m)
    bar.close()
    with _locked(out):
        m = _read_manifest(out)
        m["complete"] = {s["index"] for s in m["shards"]} >= set(range(n_shards))
        _write_manifest(out, m)
    return out


@dataclasses.dataclass
class FeatureSet:
    """All cached shards, memory-mapped; sequence s of the set is `seq(s)`."""

    manifest: dict
    shards: list[dict[str, np.ndarray]]
    index: np.ndarray  # [S, 2] (shard, sequence within shard)

    @classmethod
    def open(cls, path: os.PathLike, *, allow_partial: bool = False) -> FeatureSet:
        path = pathlib.Path(path)
        m = _read_manifest(path)
        if m is None:
            raise FeatureCacheError(
                f"{path} has no {MANIFEST}: extract features first (specdec-train --extract)"
            )
        if not m["complete"] and not allow_partial:
            raise FeatureCacheError(
                f"{path}: feature extraction was interrupted ({len(m['shards'])} shards done); "
                "rerun the same command to resume it"
            )
        shards, index, order = [], [], []
        for s in sorted(m["shards"], key=lambda s: s["index"]):
            d = path / s["name"]
            arrays = {f.stem: np.load(f, mmap_mode="r") for f in d.glob("*.npy")}
            shards.append(arrays)
            n = len(arrays["offsets"]) - 1
            index += [(len(shards) - 1, k) for k in range(n)]
            # Regenerated shards hold conversations in completion order: sort by input order.
            order += (
                list(arrays["conv_index"]) if "conv_index" in arrays else range(len(order), len(order) + n)
            )
        index = np.asarray(index, np.int64).reshape(-1, 2)[np.argsort(order, kind="stable")]
        return cls(m, shards, index)

    def head(self, n: int) -> FeatureSet:
        """The first `n` sequences (input order): equal-budget subsets, e.g. for ablations."""
        if n > len(self):
            raise FeatureCacheError(f"--max_sequences {n} exceeds the {len(self)} sequences of the cache")
        return FeatureSet(self.manifest, self.shards, self.index[:n])

    @property
    def taps(self) -> tuple[int, ...]:
        return tuple(self.manifest["taps"])

    def __len__(self) -> int:
        return len(self.index)

    def seq(self, s: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        sh, k = self.index[s]
        arrays = self.shards[sh]
        a, b = arrays["offsets"][k], arrays["offsets"][k + 1]
        return {key: arrays[key][a:b] for key in keys}

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """How often each id is the target's argmax at an assistant position (for draft vocabs)."""
        counts = np.zeros(vocab_size, np.int64)
        for arrays in self.shards:
            ids = arrays["top1"][arrays["loss_mask"]]
            np.add.at(counts, ids[ids >= 0], 1)
        return counts

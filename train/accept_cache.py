"""The acceptance-head example cache: which example builder serves a drafter (`EXAMPLES`), how
many per-depth biases its heads get (`head_depths`), and the resumable on-disk cache of its
examples (`build_examples`, `load_examples`; step 1 of `specdec.train.acceptance`'s pipeline)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np
from tqdm import tqdm

from specdec.drafters import eagle, falcon
from specdec.drafters.draft_model import DraftModel
from specdec.train.accept_examples import draft_model_examples, eagle_examples, falcon_examples
from specdec.train.accept_parallel import ROOTS, parallel_examples
from specdec.train.features import FeatureSet
from specdec.train.trainer import Batches

if TYPE_CHECKING:
    from specdec.train.acceptance import AcceptConfig

PARALLEL = tuple(ROOTS)  # drafters whose depth-d node comes from head (block position) d
# drafter class -> example builder
EXAMPLES: dict[type, Callable] = {
    eagle.Eagle: eagle_examples,
    falcon.Falcon: falcon_examples,
    DraftModel: draft_model_examples,
    **{cls: functools.partial(parallel_examples, roots=roots) for cls, roots in ROOTS.items()},
}


def head_depths(drafter, depths: int) -> int:
    """The per-depth biases an acceptance head of `drafter` gets (`accept_head.HeadSpec.depths`): a
    parallel drafter's depths (at most its heads or block positions); Falcon's `depths` (a node's
    feature comes from its own pass at depths ≡ 0 mod k and is inherited from the anchor's pass at
    the others); 0 for the others."""
    if isinstance(drafter, PARALLEL):
        return min(depths, drafter.max_depth)
    if isinstance(drafter, falcon.Falcon):
        return depths
    return 0


def example_depths(drafter, depths: int) -> int:
    """The depths the examples of `drafter` hold: 1 for a draft model (its state at a chain node
    does not depend on the depth: `draft_model_examples`), else `depths`."""
    return 1 if isinstance(drafter, DraftModel) else depths


def token_mixing(drafter, mixing: float) -> float:
    """The token mixing ratio the examples of `drafter` use: 0 for a parallel drafter, whose nodes
    read no token."""
    return 0.0 if isinstance(drafter, PARALLEL) else mixing


def build_examples(
    drafter,
    params,
    target_head,
    fs: FeatureSet,
    out_dir: os.PathLike,
    ac: AcceptConfig,
    *,
    progress: bool = True,
    drafter_id: str = "",
    log: Callable[[str], None] = print,
) -> pathlib.Path:
    """Write the examples of every sequence of `fs` to `out_dir/part_XXXXX.npz` (`seq_batch`
    sequences each, only counted rows: per head key "x" [N, D] f16, "label", "conf", "depth",
    "seq"); resumes at the first missing part. Part g's randomness is a function of (seed, g).
    `drafter_id` (`checkpoint.digest`) tells the drafter apart: a cache of another is refused."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = ac.example_settings() | {"sequences": len(fs), "drafter": drafter_id}
    mf = out / "manifest.json"
    if mf.exists():  # a cache with more temperatures serves a run that trains some of them
        have = json.loads(mf.read_text())
        other = {k: (have.get(k), v) for k, v in settings.items() if k != "temperatures" and have.get(k) != v}
        if other or not set(settings["temperatures"]) <= set(have["temperatures"]):
            raise ValueError(
                f"{out} holds acceptance examples made with other settings (cached vs requested: "
                f"{other or {'temperatures': (have['temperatures'], settings['temperatures'])}}); "
                "use another folder or delete it"
            )
        settings = have  # missing parts are built as the cache's own (its temperatures, in its order)
    mf.write_text(json.dumps(settings, indent=1))
    family = type(drafter)
    if family not in EXAMPLES:
        have = ", ".join(c.__name__ for c in EXAMPLES)
        raise ValueError(f"acceptance heads are trained for {have} drafters, not {family.__name__}")
    fn = jax.jit(
        functools.partial(
            EXAMPLES[family],
            cfg=drafter.cfg,
            depths=ac.depths,
            temperatures=tuple(settings["temperatures"]),
            mixing=ac.mixing,
            tap_final=fs.taps[-1],
        )
    )
    batches = Batches(fs, np.arange(len(fs)), 1, ac.seq_len, ac.seed)
    n_parts = -(-len(fs) // ac.seq_batch)
    done = {int(p.stem.split("_")[1]) for p in out.glob("part_*.npz")}
    bar = tqdm(
        total=n_parts, initial=len(done), desc="acceptance examples", unit="part", disable=not progress
    )
    for g in range(n_parts):
        if g in done:
            continue
        seqs = np.arange(g * ac.seq_batch, min((g + 1) * ac.seq_batch, len(fs)))
        padded = np.concatenate([seqs, np.full(ac.seq_batch - len(seqs), seqs[-1])])
        batch = batches.make(padded)
        batch = dataclasses.replace(
            batch, loss_mask=batch.loss_mask & (np.arange(ac.seq_batch) < len(seqs))[:, None]
        )
        res = jax.device_get(
            fn(
                params,
                batch=batch,
                target_head=target_head,
                key=jax.random.fold_in(jax.random.PRNGKey(ac.seed), g),
            )
        )
        arrays = {}
        for key, r in res.items():
            m = np.asarray(r["mask"])
            kk, bb, _ = np.nonzero(m)
            arrays[f"{key}.x"] = np.asarray(r["x"])[m]
            arrays[f"{key}.label"] = np.asarray(r["label"], np.float32)[m]
            arrays[f"{key}.conf"] = np.asarray(r["conf"], np.float32)[m]
            arrays[f"{key}.depth"] = (kk + 1).astype(np.int8)
            arrays[f"{key}.seq"] = padded[bb].astype(np.int32)
        tmp = out / f".part_{g:05d}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, out / f"part_{g:05d}.npz")
        bar.update(1)
    bar.close()
    return out


def load_examples(out_dir: os.PathLike, key: str) -> dict[str, np.ndarray]:
    """All cached examples of head `key`, concatenated in part order."""
    parts = sorted(pathlib.Path(out_dir).glob("part_*.npz"))
    if not parts:
        raise ValueError(f"{out_dir} holds no acceptance examples")
    loaded = [np.load(p) for p in parts]
    return {
        name: np.concatenate([f[f"{key}.{name}"] for f in loaded])
        for name in ("x", "label", "conf", "depth", "seq")
    }

"""Examples for SpecDec++ acceptance heads (step 1 of `specdec.train.acceptance`'s pipeline).

`eagle_examples`: the draft's own chain along the target's tokens at every position and depth, with
hard (T = 0) or soft (T > 0) acceptance labels, token mixing, and the draft's confidence q_T(y);
`build_examples` / `load_examples`: their resumable on-disk cache, one part per `seq_batch`
sequences. The module doc of `specdec.train.acceptance` states what a row is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from tqdm import tqdm

from specdec.attention import NEG_INF
from specdec.drafters import accept_head, eagle
from specdec.matmul import map_dense, plain
from specdec.models import decoder
from specdec.models.rope import rope_tables
from specdec.train import losses
from specdec.train.features import FeatureSet
from specdec.train.trainer import Batches

if TYPE_CHECKING:
    from specdec.train.acceptance import AcceptConfig


def _shift(x, s: int):
    """x[:, j - s] at j (zeros for j < s) along axis 1."""
    return losses._shift(x, s)


def _attend(q, k0, v0, diag_k, diag_v, step: int, cfg: eagle.EagleConfig):
    """Attention of the depth-`step` chain nodes at every position j: step-0 keys at positions
    <= j - step (committed context up to the root) and one key per ancestor / the node itself
    (`diag_k[m - 1]` = the depth-m node's key, already aligned to j). Returns [B, n, Hq Dh]."""
    b, n = q.shape[:2]
    nkv, grp, dh = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    j = jnp.arange(n)
    q = q.reshape(b, n, nkv, grp, dh) * dh**-0.5
    s_pre = jnp.einsum("btkgd,bskd->bkgts", q, k0, preferred_element_type=jnp.float32)
    s_pre = jnp.where(j[None, :] <= j[:, None] - step, s_pre, NEG_INF)
    s_diag = [
        jnp.einsum("btkgd,btkd->bkgt", q, dk, preferred_element_type=jnp.float32)[..., None] for dk in diag_k
    ]
    probs = jax.nn.softmax(jnp.concatenate([s_pre] + s_diag, axis=-1), axis=-1)
    attn = jnp.einsum("bkgts,bskd->btkgd", probs[..., :n], v0)
    for i, dv in enumerate(diag_v):
        attn = attn + probs[..., n + i].transpose(0, 3, 1, 2)[..., None] * dv[:, :, :, None, :]
    return attn.reshape(b, n, -1)


def eagle_examples(
    params,
    cfg: eagle.EagleConfig,
    batch: losses.Batch,
    target_head: Float[Array, "D V"],
    key,
    *,
    depths: int,
    temperatures: tuple[float, ...],
    mixing: float,
    tap_final: int,
) -> dict[str, dict[str, Array]]:
    """Acceptance-head examples of an EAGLE drafter for a batch of sequences [B, T] (pure; jit with
    the keyword arguments static).

    Index j (0..T-2) is position p = j + 1. At depth d the chain node at p has its root at p - d and
    the target's tokens as ancestors; its parent's logits (the depth d-1 output at p - 1) propose y.
    Returns per head key (`accept_head.key_of(T)`) arrays stacked over depth [K, B, T-1]: "x" (the
    head input, float16 [K, B, T-1, D]), "label", "conf" (the draft's q_T(y); greedy: the softmax
    probability of its top-1), "token" (y, target ids), "mask" (counted) and "mixed" (token-mixing
    positions: their input token is the target's, not y)."""
    params = map_dense(params, plain)
    toks = batch.tokens[:, 1:]
    b, n = toks.shape
    pos = jnp.broadcast_to(jnp.arange(1, n + 1), (b, n))
    lp, lc = params["layer"], cfg.layer_cfg
    rope = rope_tables(lc, pos)
    d2t = params.get("d2t")

    def branch(tokens, feature):
        x, resid = eagle.layer_input(params, cfg, tokens, feature)
        q, k, v = decoder.qkv(lp, lc, x, rope, norm=cfg.layer_norm)
        return q, k, v, resid

    feat = eagle.fuse(params, cfg, tuple(batch.taps[str(t)][:, :-1] for t in cfg.taps))
    q, k0, v0, resid = branch(toks, feat)
    out = decoder.finish(lp, lc, resid, _attend(q, k0, v0, [], [], 0, cfg))  # step 0: the root outputs
    answer = batch.loss_mask[:, 1:]  # token p is an answer token
    top1 = batch.top1[:, :-1]  # the target's argmax for token p (after position p - 1)
    j = jnp.arange(n)
    warm = [t for t in temperatures if t > 0]
    if warm:  # the target's logits for token p, full vocabulary
        final = batch.taps[str(tap_final)][:, :-1].astype(jnp.float32)
        tl = jnp.dot(final, target_head.astype(jnp.float32), preferred_element_type=jnp.float32)
    keys, values = [], []
    chain_ok = answer
    names = ("x", "token", "label", "conf", "mask", "mixed")
    res = {accept_head.key_of(t): {k: [] for k in names} for t in temperatures}
    for d in range(1, depths + 1):
        node_logits = _shift(eagle.draft_logits(params, cfg, out), 1)  # the parent's, for token p
        pfeat = _shift(out, 1)
        q, kk, vv, resid = branch(toks, pfeat)  # the chain continues on the target's token
        keys.append(kk)
        values.append(vv)
        diag_k = [_shift(km, d - m) for m, km in enumerate(keys, start=1)]
        diag_v = [_shift(vm, d - m) for m, vm in enumerate(values, start=1)]
        if d > 1:
            chain_ok = chain_ok & _shift(answer, d - 1)
        counted = chain_ok & (top1 >= 0) & (j >= d)[None, :]
        for ti, t in enumerate(temperatures):
            k_tok, k_mix = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, d), ti))
            if t == 0:
                yd = jnp.argmax(node_logits, -1)
                lq = jax.nn.log_softmax(node_logits, -1)
            else:
                lq = jax.nn.log_softmax(node_logits / t, -1)
                yd = jax.random.categorical(k_tok, lq, axis=-1)
            lq_y = jnp.take_along_axis(lq, yd[..., None], axis=-1)[..., 0]
            y = yd if d2t is None else d2t[yd]
            if t == 0:
                label = losses.accept_label_hard(y, top1)
            else:
                lp_all = tl / t
                lp_y = jnp.take_along_axis(lp_all, y[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(
                    lp_all, -1
                )
                label = losses.accept_label_soft(lp_y, lq_y)
            mixed = jax.random.uniform(k_mix, (b, n)) < mixing
            z = jnp.where(mixed, toks, y)
            qa, ka, va, ra = branch(z, pfeat)
            alt = decoder.finish(
                lp, lc, ra, _attend(qa, k0, v0, diag_k[:-1] + [ka], diag_v[:-1] + [va], d, cfg)
            )
            r = res[accept_head.key_of(t)]
            r["x"].append(eagle.accept_input(params, cfg, alt).astype(jnp.float16))
            r["token"].append(y)
            r["label"].append(label)
            r["conf"].append(jnp.exp(lq_y))
            r["mask"].append(counted & ~mixed)
            r["mixed"].append(mixed)
        out = decoder.finish(lp, lc, resid, _attend(q, k0, v0, diag_k, diag_v, d, cfg))
    return {k: {name: jnp.stack(v) for name, v in r.items()} for k, r in res.items()}


EXAMPLES: dict[str, Callable] = {"eagle": eagle_examples}  # drafter.json family -> example builder


# ----------------------------------------------------------------------------------- example cache
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
    family = "eagle" if isinstance(drafter, eagle.Eagle) else type(drafter).__name__
    if family not in EXAMPLES:
        raise ValueError(f"acceptance heads are trained for {', '.join(EXAMPLES)} drafters, not {family}")
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

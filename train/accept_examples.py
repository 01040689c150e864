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
from specdec.cache import causal_mask
from specdec.drafters import accept_head, amphista, dflash, eagle, medusa
from specdec.matmul import dense, map_dense, plain
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


def _draft_token(node_logits: Float[Array, "... Vd"], t: float, key, d2t):
    """The node's draft token (target ids) and log q_T of it: the top-1 at T = 0, a sample of q_T
    at T > 0 (q over the draft vocabulary)."""
    if t == 0:
        yd = jnp.argmax(node_logits, -1)
        lq = jax.nn.log_softmax(node_logits, -1)
    else:
        lq = jax.nn.log_softmax(node_logits / t, -1)
        yd = jax.random.categorical(key, lq, axis=-1)
    lq_y = jnp.take_along_axis(lq, yd[..., None], axis=-1)[..., 0]
    return (yd if d2t is None else d2t[yd]), lq_y


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
            y, lq_y = _draft_token(node_logits, t, k_tok, d2t)
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


# ------------------------------------------------------------------------------ parallel drafters
def _ahead(x, k: int):
    """x[:, j + k] at j = 0..T-2 along axis 1 (zeros past the end)."""
    t = x.shape[1]
    pad = jnp.zeros((x.shape[0], k) + x.shape[2:], x.dtype)
    return jax.lax.slice_in_dim(jnp.concatenate([x, pad], axis=1), k, k + t - 1, axis=1)


def _medusa_roots(params, cfg, batch: losses.Batch, depths: int):
    """Medusa: the feature at r - 1 predicted the root r; head d - 1 drafts depth d."""
    h = medusa.head_hidden(params, batch.taps[str(cfg.tap)][:, :-1])[..., :depths, :]
    return h, medusa.head_logits(params, cfg, None, h), None


def _amphista_roots(params, cfg, batch: losses.Batch, depths: int):
    """Amphista: the adapted pair (h_{r-1}, x_r) at r - 1 (causal stages over the sequence)."""
    b, t = batch.tokens.shape
    nxt = jnp.concatenate([batch.tokens[:, 1:], jnp.zeros_like(batch.tokens[:, :1])], axis=1)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    a, _ = amphista.adapt(params, cfg, batch.taps[str(cfg.tap)], nxt, pos, None, causal_mask(b, t))
    g = amphista.head_hidden(params, cfg, a[:, :-1])[..., :depths, :]  # (the heads attend to each other)
    return g, amphista.head_logits(params, cfg, None, g), None


def _dflash_roots(params, cfg, batch: losses.Batch, depths: int, stride: int = 4):
    """DFlash: a block anchored at every `stride`-th root r = 1, 1 + stride, ... (context = the taps
    before r; one block forward per root is the costly part, and neighbouring roots say much the
    same); block position d drafts depth d. The other roots are masked out."""
    b, t = batch.tokens.shape
    taps = tuple(batch.taps[str(x)] for x in cfg.taps)
    anchors = jnp.arange(1, t, stride, dtype=jnp.int32)
    out = dflash.train_forward(params, cfg, batch.tokens, taps, jnp.broadcast_to(anchors, (b, len(anchors))))
    g = dflash.accept_input(params, cfg, out[:, :, 1 : depths + 1])
    hidden = jnp.zeros((b, t - 1) + g.shape[2:], g.dtype).at[:, anchors - 1].set(g)
    is_root = jnp.zeros((b, t - 1), bool).at[:, anchors - 1].set(True)
    return hidden, dense(hidden, params["head"]), is_root


def parallel_examples(
    params,
    cfg,
    batch: losses.Batch,
    target_head: Float[Array, "D V"],
    key,
    *,
    roots: Callable,
    depths: int,
    temperatures: tuple[float, ...],
    mixing: float,
    tap_final: int,
) -> dict[str, dict[str, Array]]:
    """Acceptance-head examples of a parallel drafter (Medusa, Amphista, DFlash) for a batch of
    sequences [B, T] (pure; jit with the keyword arguments static), in `eagle_examples`' format.

    Index j (0..T-2) is the root r = j + 1; the depth-d node of root r is token r + d, drafted by
    head (block position) d from what the drafter computes for the root alone (`roots(params, cfg,
    batch, depths)` -> per root and depth the state its vocabulary projection reads [B, T-1, K, D],
    the draft logits [B, T-1, K, Vd] and which roots it computed [B, T-1] or None for all), so the
    node does not depend on its ancestors' tokens and there is no token mixing (`mixing` is unused;
    "mixed" is all False). Counted where the drafter ran at r, tokens r..r + d are answer tokens and
    the target's argmax for r + d is known."""
    del mixing
    params = map_dense(params, plain)
    hidden, logits, is_root = roots(params, cfg, batch, depths)
    depths = hidden.shape[2]  # at most the drafter's heads / block positions
    d2t = params.get("d2t")
    answer, top1 = batch.loss_mask, batch.top1
    final = batch.taps[str(tap_final)].astype(jnp.float32)
    # the target's log-probabilities after every position at each temperature (full vocabulary), once
    target_lp = {
        t: jax.nn.log_softmax(
            jnp.dot(final, target_head.astype(jnp.float32), preferred_element_type=jnp.float32) / t
        )
        for t in temperatures
        if t > 0
    }
    b, n = hidden.shape[:2]
    rows, j = jnp.arange(b)[:, None], jnp.arange(n)[None, :]
    names = ("x", "token", "label", "conf", "mask", "mixed")
    res = {accept_head.key_of(t): {k: [] for k in names} for t in temperatures}
    chain_ok = _ahead(answer, 1)  # the root r is an answer token (and one the drafter was run at)
    if is_root is not None:
        chain_ok = chain_ok & is_root
    for d in range(1, depths + 1):
        chain_ok = chain_ok & _ahead(answer, 1 + d)  # token r + d (False past the sequence)
        want = _ahead(top1, d)  # the target's argmax for token r + d
        counted = chain_ok & (want >= 0)
        node_logits = logits[:, :, d - 1].astype(jnp.float32)
        for ti, t in enumerate(temperatures):
            k_tok = jax.random.fold_in(jax.random.fold_in(key, d), ti)
            y, lq_y = _draft_token(node_logits, t, k_tok, d2t)
            if t == 0:
                label = losses.accept_label_hard(y, want)
            else:
                # log p_T(y) for token r + d (position r + d - 1 = j + d; past the end: not counted)
                lp_y = target_lp[t][rows, jnp.minimum(j + d, n), y]
                label = losses.accept_label_soft(lp_y, lq_y)
            r = res[accept_head.key_of(t)]
            r["x"].append(hidden[:, :, d - 1].astype(jnp.float16))
            r["token"].append(y)
            r["label"].append(label)
            r["conf"].append(jnp.exp(lq_y))
            r["mask"].append(counted)
            r["mixed"].append(jnp.zeros_like(counted))
    return {k: {name: jnp.stack(v) for name, v in r.items()} for k, r in res.items()}


def head_depths(drafter, depths: int) -> int:
    """The per-depth biases an acceptance head of `drafter` gets (`accept_head.HeadSpec.depths`): a
    parallel drafter's depths (at most its heads or block positions), 0 for the others."""
    if isinstance(drafter, PARALLEL):
        return min(depths, drafter.max_depth)
    return 0


PARALLEL = (medusa.Medusa, amphista.Amphista, dflash.DFlash)
# drafter class -> example builder
EXAMPLES: dict[type, Callable] = {
    eagle.Eagle: eagle_examples,
    medusa.Medusa: functools.partial(parallel_examples, roots=_medusa_roots),
    amphista.Amphista: functools.partial(parallel_examples, roots=_amphista_roots),
    dflash.DFlash: functools.partial(parallel_examples, roots=_dflash_roots),
}


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

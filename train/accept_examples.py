"""Examples for SpecDec++ acceptance heads of chain drafters (step 1 of `specdec.train.acceptance`'s
pipeline): the draft's own chain along the target's tokens at every position and depth, with hard
(T = 0) or soft (T > 0) acceptance labels, token mixing, and the draft's confidence q_T(y), for
EAGLE (`eagle_examples`), Falcon (`falcon_examples`) and a draft model or layer-skip
(`draft_model_examples`). Parallel drafters: `accept_parallel`; the
on-disk cache: `accept_cache`. The module doc of `specdec.train.acceptance` states what a row is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from specdec.attention import NEG_INF
from specdec.cache import causal_mask
from specdec.drafters import accept_head, eagle, falcon
from specdec.matmul import map_dense, plain
from specdec.models import decoder, forward
from specdec.models.config import ModelConfig
from specdec.models.rope import rope_tables
from specdec.train import losses


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


def draft_token(node_logits: Float[Array, "... Vd"], t: float, key, d2t):
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


def _layer(params, cfg: eagle.EagleConfig, b: int, n: int):
    """The draft layer split at its attention, for pairs at positions 1..n: `branch(tokens,
    features) -> (q, k, v, residual)` and `finish(residual, attention) -> output`."""
    lp, lc = params["layer"], cfg.layer_cfg
    rope = rope_tables(lc, jnp.broadcast_to(jnp.arange(1, n + 1), (b, n)))

    def branch(tokens, feature):
        x, resid = eagle.layer_input(params, cfg, tokens, feature)
        q, k, v = decoder.qkv(lp, lc, x, rope, norm=cfg.layer_norm)
        return q, k, v, resid

    return branch, functools.partial(decoder.finish, lp, lc)


def _targets(batch: losses.Batch, target_head, temperatures: tuple[float, ...], tap_final: int):
    """(answer [B, T-1]: token p is an answer token, top1 [B, T-1]: the target's argmax for token p,
    label_of(t, y, log q_t(y)) -> the acceptance label of draft tokens y [B, T-1] for token p)."""
    top1 = batch.top1[:, :-1]  # after position p - 1
    if any(t > 0 for t in temperatures):  # the target's logits for token p, full vocabulary
        final = batch.taps[str(tap_final)][:, :-1].astype(jnp.float32)
        tl = jnp.dot(final, target_head.astype(jnp.float32), preferred_element_type=jnp.float32)

    def label_of(t: float, y, lq_y):
        if t == 0:
            return losses.accept_label_hard(y, top1)
        lp_y = jnp.take_along_axis(tl / t, y[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(tl / t, -1)
        return losses.accept_label_soft(lp_y, lq_y)

    return batch.loss_mask[:, 1:], top1, label_of


NAMES = ("x", "token", "label", "conf", "mask", "mixed")


def _results(temperatures):
    return {accept_head.key_of(t): {k: [] for k in NAMES} for t in temperatures}


def _append(r: dict, x, y, label, lq_y, counted, mixed):
    r["x"].append(x.astype(jnp.float16))
    r["token"].append(y)
    r["label"].append(label)
    r["conf"].append(jnp.exp(lq_y))
    r["mask"].append(counted & ~mixed)
    r["mixed"].append(mixed)


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
    branch, finish = _layer(params, cfg, b, n)
    d2t = params.get("d2t")
    feat = eagle.fuse(params, cfg, tuple(batch.taps[str(t)][:, :-1] for t in cfg.taps))
    q, k0, v0, resid = branch(toks, feat)
    out = finish(resid, _attend(q, k0, v0, [], [], 0, cfg))  # step 0: the root outputs
    answer, top1, label_of = _targets(batch, target_head, temperatures, tap_final)
    j = jnp.arange(n)
    keys, values = [], []
    chain_ok = answer
    res = _results(temperatures)
    for d in range(1, depths + 1):
        node_logits = losses.shift(eagle.draft_logits(params, cfg, out), 1)  # the parent's, for token p
        pfeat = losses.shift(out, 1)
        q, kk, vv, resid = branch(toks, pfeat)  # the chain continues on the target's token
        keys.append(kk)
        values.append(vv)
        diag_k = [losses.shift(km, d - m) for m, km in enumerate(keys, start=1)]
        diag_v = [losses.shift(vm, d - m) for m, vm in enumerate(values, start=1)]
        if d > 1:
            chain_ok = chain_ok & losses.shift(answer, d - 1)
        counted = chain_ok & (top1 >= 0) & (j >= d)[None, :]
        for ti, t in enumerate(temperatures):
            k_tok, k_mix = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, d), ti))
            y, lq_y = draft_token(node_logits, t, k_tok, d2t)
            mixed = jax.random.uniform(k_mix, (b, n)) < mixing
            z = jnp.where(mixed, toks, y)
            qa, ka, va, ra = branch(z, pfeat)
            alt = finish(ra, _attend(qa, k0, v0, diag_k[:-1] + [ka], diag_v[:-1] + [va], d, cfg))
            _append(res[accept_head.key_of(t)], eagle.accept_input(params, cfg, alt), y,
                    label_of(t, y, lq_y), lq_y, counted, mixed)  # fmt: skip
        out = finish(resid, _attend(q, k0, v0, diag_k, diag_v, d, cfg))
    return {k: {name: jnp.stack(v) for name, v in r.items()} for k, r in res.items()}


def falcon_examples(
    params,
    cfg: falcon.FalconConfig,
    batch: losses.Batch,
    target_head: Float[Array, "D V"],
    key,
    *,
    depths: int,
    temperatures: tuple[float, ...],
    mixing: float,
    tap_final: int,
) -> dict[str, dict[str, Array]]:
    """Acceptance-head examples of a Falcon drafter (k tokens per pass) for a batch of sequences
    [B, T], in `eagle_examples`' format (pure; jit with the keyword arguments static).

    Index j (0..T-2) is position p = j + 1; the depth-d chain node at p has its root at r = p - d
    and the target's tokens as ancestors, as `falcon.Falcon` drafts it: the root's pass over the
    committed pairs p_{r-k+1..r} gives out(0) and the feature its children inherit; a node at
    depth a ≡ 0 (mod k) runs a pass over its path's last k pairs (its parent's feature, its token)
    that sees the committed pairs <= r and the path, whose first output is out(a) and second the
    inherited one; the other depths inherit. The head reads out(d); at depths ≡ 0 (mod k) out(d)
    depends on the node's token, so it is recomputed with y (or, mixed, the target's token); at the
    others the node's token is not read and nothing is mixed."""
    params = map_dense(params, plain)
    toks = batch.tokens[:, 1:]
    b, n = toks.shape
    k = cfg.k
    branch, finish = _layer(params, cfg, b, n)
    d2t = params.get("d2t")
    q0, k0, v0, r0 = branch(toks, batch.taps[str(cfg.taps[0])][:, :-1])  # the committed (true) pairs
    # the root's pass: query i sits at r - k + 1 + i and sees every pair <= r; by node position
    root_pass = [finish(r0, _attend(q0, k0, v0, [], [], i + 1 - k, cfg)) for i in range(min(k, 2))]
    out = {0: losses.shift(root_pass[0], k - 1)}  # out(d): indexed by the depth-d node's position
    inherit = {0: losses.shift(root_pass[-1], max(k - 2, 0))}  # at the anchors (the root, depths ≡ 0 mod k)
    answer, top1, label_of = _targets(batch, target_head, temperatures, tap_final)
    j = jnp.arange(n)
    pairs = {}  # m -> (q, k, v, residual) of the depth-m pair on the target's chain, by its position
    chain_ok = answer
    res = _results(temperatures)

    def pass_output(m: int, a: int, last=None):
        """Query depth m's output in the pass anchored at depth a (`last`: the depth-a pair's
        (q, k, v, residual) instead of the target chain's), by the depth-m node's position."""
        got = {**pairs, a: last} if last is not None else pairs
        diag_k = [losses.shift(got[i][1], m - i) for i in range(1, a + 1)]
        diag_v = [losses.shift(got[i][2], m - i) for i in range(1, a + 1)]
        return finish(got[m][3], _attend(got[m][0], k0, v0, diag_k, diag_v, m, cfg))

    for d in range(1, depths + 1):
        node_logits = losses.shift(
            eagle.draft_logits(params, cfg, out[d - 1]), 1
        )  # the parent's, for token p
        pfeat = losses.shift(out[d - 1], 1)
        pairs[d] = branch(toks, pfeat)  # the chain continues on the target's token
        anchored = d % k == 0
        if anchored:  # out(d): the first query (depth d - k + 1), aligned to the depth-d node
            out[d] = losses.shift(pass_output(d - k + 1, d), k - 1)
            inherit[d] = losses.shift(pass_output(min(d - k + 2, d), d), max(k - 2, 0))
        else:
            out[d] = losses.shift(inherit[d - d % k], d % k)
        if d > 1:
            chain_ok = chain_ok & losses.shift(answer, d - 1)
        counted = chain_ok & (top1 >= 0) & (j >= d + k - 1)[None, :]  # the root's pass has k pairs
        for ti, t in enumerate(temperatures):
            k_tok, k_mix = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, d), ti))
            y, lq_y = draft_token(node_logits, t, k_tok, d2t)
            if anchored:
                mixed = jax.random.uniform(k_mix, (b, n)) < mixing
                alt = pass_output(d - k + 1, d, branch(jnp.where(mixed, toks, y), pfeat))
                x = losses.shift(alt, k - 1)
            else:
                mixed, x = jnp.zeros((b, n), bool), out[d]
            _append(res[accept_head.key_of(t)], eagle.accept_input(params, cfg, x), y,
                    label_of(t, y, lq_y), lq_y, counted, mixed)  # fmt: skip
    return {k: {name: jnp.stack(v) for name, v in r.items()} for k, r in res.items()}


def draft_model_examples(
    params,
    cfg: ModelConfig,
    batch: losses.Batch,
    target_head: Float[Array, "D V"],
    key,
    *,
    depths: int,
    temperatures: tuple[float, ...],
    mixing: float,
    tap_final: int,
) -> dict[str, dict[str, Array]]:
    """Acceptance-head examples of a draft model (`DraftModel`: an independent model or layer-skip)
    for a batch of sequences [B, T], in `eagle_examples`' format with one depth (pure; jit with the
    keyword arguments static).

    A draft model's state at a chain node depends only on the tokens it consumed: the committed
    prefix and the ancestors, which are the target's tokens once the parent is accepted. So the
    depth-d node at position p reads the same state for every d, and one row per position serves
    all depths (`depths` is not used). Index j (0..T-2) is position p = j + 1: the draft's logits
    after token p - 1 (teacher-forced) propose y; the head reads the final normed state after y at
    p with the target's tokens < p as context. The context stream and one such stream per
    temperature run as one forward whose mask lets a y row see the context before it and itself.
    Mixed rows (probability `mixing`) read the target's token instead and are not counted."""
    params = map_dense(params, plain)
    toks = batch.tokens
    b, t = toks.shape
    n = t - 1
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, _, _ = forward(params, cfg, toks, pos, None, causal_mask(b, t))
    node_logits = logits[:, :-1]  # after token p - 1: proposes token p
    answer, top1, label_of = _targets(batch, target_head, temperatures, tap_final)
    counted = answer & (top1 >= 0)
    drafted = []
    for ti, temp in enumerate(temperatures):
        k_tok, k_mix = jax.random.split(jax.random.fold_in(key, ti))
        y, lq_y = draft_token(node_logits, temp, k_tok, None)
        mixed = jax.random.uniform(k_mix, (b, n)) < mixing
        drafted.append((y, lq_y, mixed, jnp.where(mixed, toks[:, 1:], y)))
    # [context (t) ; one alternative stream (n) per temperature]: row p of a stream sees context < p
    m = len(temperatures)
    sees_ctx = jnp.arange(t)[None, :] < jnp.arange(1, t)[:, None]  # [n, t]
    mask = jnp.zeros((t + m * n, t + m * n), bool).at[:t, :t].set(jnp.tril(jnp.ones((t, t), bool)))
    for i in range(m):
        rows = slice(t + i * n, t + (i + 1) * n)
        mask = mask.at[rows, :t].set(sees_ctx).at[rows, rows].set(jnp.eye(n, dtype=bool))
    stream = jnp.concatenate([toks] + [z for *_, z in drafted], axis=1)
    spos = jnp.concatenate([pos] + [pos[:, 1:]] * m, axis=1)
    _, (hidden,), _ = forward(params, cfg, stream, spos, None, jnp.broadcast_to(mask, (b,) + mask.shape),
                              taps=(cfg.num_layers,), logits_idx=jnp.zeros((b, 1), jnp.int32))  # fmt: skip
    res = _results(temperatures)
    for i, (temp, (y, lq_y, mixed, _)) in enumerate(zip(temperatures, drafted, strict=True)):
        x = hidden[:, t + i * n : t + (i + 1) * n]
        _append(res[accept_head.key_of(temp)], x, y, label_of(temp, y, lq_y), lq_y, counted, mixed)
    return {k: {name: jnp.stack(v) for name, v in r.items()} for k, r in res.items()}

"""Acceptance-head examples of parallel drafters (Medusa, Amphista, DFlash): every answer position
as the root, each head or block position drafting its depth from what the drafter computes for
the root alone (`parallel_examples`, in `accept_examples.eagle_examples`' format)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from specdec.cache import causal_mask
from specdec.drafters import accept_head, amphista, dflash, medusa
from specdec.matmul import dense, map_dense, plain
from specdec.train import losses
from specdec.train.accept_examples import draft_token


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
            y, lq_y = draft_token(node_logits, t, k_tok, d2t)
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


# drafter class -> what it computes for a root alone
ROOTS: dict[type, Callable] = {
    medusa.Medusa: _medusa_roots,
    amphista.Amphista: _amphista_roots,
    dflash.DFlash: _dflash_roots,
}

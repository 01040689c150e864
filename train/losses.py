"""Drafter training losses over teacher-forced target features (reference notes §2).

A batch (`Batch`) holds sequences of T tokens with the target's taps at every position, the
target's argmax next token `top1` and the assistant-token mask. Position p's prediction target is
token p + 1, whose label is the target's own argmax at p (self-distillation at T = 0: the draft
learns what the target would say) and whose soft target is the target's distribution at p,
restricted to the draft vocabulary. Positions whose label is outside the draft vocabulary are
masked (as EAGLE-3 does).

- Medusa: head k at p predicts p + k + 2 with label `top1[p + k + 1]`; Σ_k 0.8^k CE_k.
- Amphista: the same heads loss, the heads reading the adaptation stages' output at p (pairs
  (h_p, x_{p+1}), causal over the sequence).
- EAGLE-1: pairs (f[p-1] + U(-0.1, 0.1) noise, x_p) -> f̂_p; SmoothL1(f̂_p, f_p) + 0.1 CE(p_target, p̂).
- EAGLE-3: training-time test over `ttt_steps` unrolled steps, step k feeding the draft's own
  step-(k-1) outputs as features; weights 0.8^k; CE against the restricted target distribution; no
  feature loss. Step k at position p attends to step-0 keys at positions <= p - k and to the
  step-m key at p - k + m (m = 1..k): exactly what a depth-(k+1) chain node sees at inference.

`loss` picks the divergence to the target's (draft-vocabulary) distribution p from the draft's q:
- "ce": cross-entropy -Σ p log q (KL up to a constant; EAGLE's objective; Medusa: hard labels);
- "tv": total variation ½ Σ |p - q| = 1 - α, α = Σ min(p, q) the probability that speculative
  sampling accepts the draft token: minimising it maximises acceptance directly, but its gradient
  vanishes where q has no mass;
- "lk": the LK hybrid (arXiv 2602.23881) λ KL(p‖q) + (1 - λ) TV with λ = exp(-3 α), α the current
  acceptance at that position (no gradient through λ): KL's useful gradients while the draft is far
  off, TV's acceptance objective once it is close.

- Falcon: EAGLE-1's loss on semi-autoregressive blocks of k pairs (relaxed block-causal mask,
  random block offset): the output at pair p predicts f_{p+k-1} (token p + k); CSGD's second pass
  feeds the first pass's drafted pairs back with glancing (`falcon.glance`); both passes count.
- DFlash: anchored blocks. Per sequence `num_anchors` anchors are drawn among positions whose token
  and next token are answer tokens; block position k (1..K-1) predicts token anchor + k with label
  `top1[anchor + k - 1]`, attending to context strictly before the anchor and to its own block
  (`dflash.training_mask`). Position weights: `decay` exp(-(k-1)/γ) (DFlash, γ = 7 for K = 16) or
  `dpace` (D-PACE: q̃_j = (1-α) q_j + α with q_j the draft's probability of label j, weight_k =
  Σ_{m>=k} Π_{j<=m} q̃_j, α = 0.5, detached: positions the draft can still reach count more).

A new family's loss can build on the generic pieces: `heads_loss` (parallel heads over [B, T, K, Vd]
logits), `divergence`, `soft_targets`, `acceptance` (docs/drafters.md, "Adding a trained family").

Each returns (loss, metrics) with per-head/per-step top-1 accuracy among counted positions
(`acc{k}`: a greedy chain's acceptance at T = 0) and, for EAGLE-1/3, the expected acceptance at
T = 1 (`alpha{k}` = Σ min(p, q), both over the draft vocabulary).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from specdec.attention import NEG_INF
from specdec.cache import causal_mask
from specdec.drafters import amphista, dflash, eagle, falcon, medusa
from specdec.models import decoder
from specdec.models.rope import rope_tables


@flax.struct.dataclass
class Batch:
    tokens: Int[Array, "B T"]
    loss_mask: Bool[Array, "B T"]  # token t is an assistant token (and not padding)
    top1: Int[Array, "B T"]  # the target's argmax next token after position t
    taps: dict  # tap index (as str) -> Float[B, T, D]


def soft_targets(params, batch: Batch, tap_final: str) -> Float[Array, "B T Vd"]:
    """The target's next-token distribution at every position, restricted to the draft vocab (from its
    final normed state, tap `tap_final`, and the frozen "target_head" the trainer passes)."""
    f = batch.taps[tap_final].astype(jnp.float32)
    return jax.nn.softmax(jnp.dot(f, params["target_head"], preferred_element_type=jnp.float32), axis=-1)


LOSSES = ("ce", "tv", "lk")


def divergence(p: Float[Array, "... V"], logq: Float[Array, "... V"], kind: str) -> Float[Array, "..."]:
    """Per-position divergence of the draft (log-probs `logq`) from the target `p` (see module doc)."""
    if kind == "ce":
        return -jnp.sum(p * logq, -1)
    tv = 0.5 * jnp.sum(jnp.abs(p - jnp.exp(logq)), -1)
    if kind == "tv":
        return tv
    if kind == "lk":
        kl = jnp.sum(jax.scipy.special.xlogy(p, p) - p * logq, -1)
        lam = jnp.exp(-3.0 * jax.lax.stop_gradient(1.0 - tv))
        return lam * kl + (1.0 - lam) * tv
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def _masked_mean(x, m):
    m = m.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def acceptance(p: Float[Array, "... V"], logq: Float[Array, "... V"]) -> Float[Array, "..."]:
    """α = Σ min(p, q): the probability that speculative sampling (T = 1) accepts a draft token
    sampled from q, against the target's p (both over the draft vocabulary here)."""
    return jnp.sum(jnp.minimum(p, jnp.exp(logq)), -1)


def _labels(t2d, top1):
    """Draft-vocabulary labels and where they count (-1 top1 = not computed, e.g. prompt positions)."""
    lab = t2d[jnp.maximum(top1, 0)]
    return lab, (lab >= 0) & (top1 >= 0)


def heads_loss(logits: Float[Array, "B T K Vd"], batch: Batch, t2d, soft, loss: str = "ce"):
    """Parallel heads (Medusa, Amphista): head k at position p predicts token p + k + 2, label
    `top1[p + k + 1]`, counted where that token is an answer token; weights 0.8^k."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    t = batch.tokens.shape[1]
    total, metrics = 0.0, {}
    for k in range(logits.shape[2]):
        s = k + 1
        n = t - s - 1
        if n <= 0:
            continue
        lab, ok = _labels(t2d, batch.top1[:, s : s + n])
        m = ok & batch.loss_mask[:, s + 1 :]
        lp = logp[:, :n, k]
        if soft is None:
            d = -jnp.take_along_axis(lp, jnp.maximum(lab, 0)[..., None], axis=-1)[..., 0]
        else:  # the target's distribution of token p + k + 2, at position p + k + 1
            d = divergence(soft[:, s : s + n], lp, loss)
        total = total + 0.8**k * _masked_mean(d, m)
        metrics[f"acc{k}"] = _masked_mean(jnp.argmax(lp, -1) == lab, m)
    return total, metrics


def medusa_loss(params, cfg: medusa.MedusaConfig, batch: Batch, t2d, key=None, loss: str = "ce"):
    del key
    f = batch.taps[str(cfg.tap)]
    soft = None if loss == "ce" else soft_targets(params, batch, str(cfg.tap))
    return heads_loss(medusa.head_logits(params, cfg, f), batch, t2d, soft, loss)


def amphista_loss(params, cfg: amphista.AmphistaConfig, batch: Batch, t2d, key=None, loss: str = "ce"):
    """Pairs (h_t, x_{t+1}) through the adaptation stages (causal), then the heads."""
    del key
    f = batch.taps[str(cfg.tap)]
    b, t = batch.tokens.shape
    nxt = jnp.concatenate([batch.tokens[:, 1:], jnp.zeros_like(batch.tokens[:, :1])], axis=1)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    a, _ = amphista.adapt(params, cfg, f, nxt, pos, None, causal_mask(b, t))
    soft = None if loss == "ce" else soft_targets(params, batch, str(cfg.tap))
    return heads_loss(amphista.head_logits(params, cfg, a), batch, t2d, soft, loss)


def _pairs(batch: Batch):
    """Inputs for pairs at positions 1..T-1: tokens x_p, positions p; mask of p's target (p + 1)."""
    toks = batch.tokens[:, 1:]
    b, n = toks.shape
    pos = jnp.broadcast_to(jnp.arange(1, n + 1), (b, n))
    target_mask = jnp.concatenate([batch.loss_mask[:, 2:], jnp.zeros((b, 1), bool)], axis=1)
    return toks, pos, target_mask


def eagle1_loss(params, cfg: eagle.EagleConfig, batch: Batch, t2d, key, noise: float = 0.1, loss: str = "ce",
                align_steps: int = 1):  # fmt: skip
    """EAGLE-1: feature regression (SmoothL1) + 0.1 x divergence to the target, teacher-forced.

    `align_steps` > 1 adds HASS's harmonised context alignment (arXiv 2408.15766): step k feeds the
    draft's own outputs of step k - 1 back as the features of the last k context positions, exactly
    what a chain node at depth k + 1 sees at inference (`eagle3_outputs`, tested against the
    drafter); step k's losses are weighted 0.8^k, like EAGLE-3's training-time test.
    """
    tap = str(cfg.taps[0])
    f = batch.taps[tap].astype(jnp.float32)
    toks, pos, tmask = _pairs(batch)
    feat = f[:, :-1]
    if noise:  # on the target's features only, as EAGLE; drafted features enter unperturbed
        feat = feat + jax.random.uniform(key, feat.shape, minval=-noise, maxval=noise)
    if align_steps == 1:
        n = toks.shape[1]
        out, _ = eagle.run_layer(params, cfg, toks, feat, pos, None, causal_mask(toks.shape[0], n))
        outs = [out]
    else:  # eagle3_outputs takes taps at positions 0..T-1 (the last is never an input)
        padded = jnp.pad(feat, ((0, 0), (0, 1), (0, 0)))
        outs = eagle3_outputs(params, cfg, batch.tokens, (padded,), align_steps)
    lab, ok = _labels(t2d, batch.top1[:, 1:])
    soft = soft_targets(params, batch, tap)[:, 1:]
    j = jnp.arange(tmask.shape[1])
    total, metrics = 0.0, {}
    for k, out in enumerate(outs):
        m = tmask & ok & (j >= k)[None, :]  # step k needs a real pair at p - k
        reg = jnp.sum(optax.huber_loss(out, f[:, 1:], delta=1.0), -1)  # = SmoothL1 with beta 1
        logp = jax.nn.log_softmax(eagle.draft_logits(params, cfg, out), -1)
        d = divergence(soft, logp, loss)
        # The feature loss is summed over D in EAGLE's code with mean over tokens; we divide by D so
        # the two terms stay comparable across hidden sizes (a constant rescaling of the signal).
        total = total + 0.8**k * (_masked_mean(reg, m) / cfg.hidden_size + 0.1 * _masked_mean(d, m))
        metrics[f"acc{k}"] = _masked_mean(jnp.argmax(logp, -1) == lab, m)
        metrics[f"alpha{k}"] = _masked_mean(acceptance(soft, logp), m)
        if k == 0:
            metrics["reg"] = _masked_mean(reg, m)
    return total, metrics


def shift(x, s: int):
    """x[:, j - s] at j along axis 1 (zeros where j - s is outside; s < 0 looks ahead)."""
    if s == 0:
        return x
    if s < 0:
        return jnp.concatenate([x[:, -s:], jnp.zeros_like(x[:, :-s])], axis=1)
    return jnp.concatenate([jnp.zeros_like(x[:, :s]), x[:, :-s]], axis=1)


def eagle3_outputs(params, cfg: eagle.EagleConfig, tokens: Int[Array, "B T"], taps, ttt_steps: int):
    """Draft outputs [B, T-1, D] of each training-time-test step for pairs at positions 1..T-1.

    `taps`: the target taps (low, mid, high) at positions 0..T-1. Step k's output at position p is
    what a chain node at depth k + 1 (root at p - k) computes at inference.
    """
    toks = tokens[:, 1:]
    b, n = toks.shape
    pos = jnp.broadcast_to(jnp.arange(1, n + 1), (b, n))
    feat = eagle.fuse(params, cfg, tuple(t[:, :-1] for t in taps))
    nkv, grp, dh = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    j = jnp.arange(n)
    lp, lc = params["layer"], cfg.layer_cfg
    rope = rope_tables(lc, pos)  # the draft layer's blocks (`specdec.models.decoder`), one RoPE table
    keys, values, outs = [], [], []  # step m's keys/values (m >= 1), unshifted
    for k in range(ttt_steps):
        x, resid = eagle.layer_input(params, cfg, toks, feat)
        q, kk, vv = decoder.qkv(lp, lc, x, rope, norm=cfg.layer_norm)
        q = q.reshape(b, n, nkv, grp, dh) * dh**-0.5
        if k == 0:
            k0, v0 = kk, vv
        else:
            keys.append(kk)
            values.append(vv)
        prefix_ok = j[None, :] <= j[:, None] - k  # [n, n]: key position <= query position - k
        s_pre = jnp.einsum("btkgd,bskd->bkgts", q, k0, preferred_element_type=jnp.float32)
        s_pre = jnp.where(prefix_ok, s_pre, NEG_INF)
        # step m's key at position p - k + m (m = 1..k; m = k is the query's own key)
        diag_k = [shift(km, k - m) for m, km in enumerate(keys, start=1)]
        diag_v = [shift(vm, k - m) for m, vm in enumerate(values, start=1)]
        s_diag = [jnp.einsum("btkgd,btkd->bkgt", q, dk, preferred_element_type=jnp.float32)[..., None]
                  for dk in diag_k]  # fmt: skip
        probs = jax.nn.softmax(jnp.concatenate([s_pre] + s_diag, axis=-1), axis=-1)
        attn = jnp.einsum("bkgts,bskd->btkgd", probs[..., :n], v0)
        for i, dv in enumerate(diag_v):
            attn = attn + probs[..., n + i].transpose(0, 3, 1, 2)[..., None] * dv[:, :, :, None, :]
        out = decoder.finish(lp, lc, resid, attn.reshape(b, n, -1))
        outs.append(out)
        feat = shift(out, 1)  # the next step's feature at p is this step's output at p - 1
    return outs


def eagle3_loss(params, cfg: eagle.EagleConfig, batch: Batch, t2d, key=None, ttt_steps: int = 3,
                tap_final: int | None = None, loss: str = "ce"):  # fmt: skip
    del key
    _, _, tmask = _pairs(batch)
    outs = eagle3_outputs(params, cfg, batch.tokens, tuple(batch.taps[str(t)] for t in cfg.taps), ttt_steps)
    lab, ok = _labels(t2d, batch.top1[:, 1:])
    soft = soft_targets(params, batch, str(tap_final))[:, 1:]
    j = jnp.arange(tmask.shape[1])
    total, metrics = 0.0, {}
    for k, out in enumerate(outs):
        logp = jax.nn.log_softmax(eagle.draft_logits(params, cfg, out), -1)
        m = tmask & ok & (j >= k)[None, :]  # step k needs a real pair at p - k
        total = total + 0.8**k * _masked_mean(divergence(soft, logp, loss), m)
        metrics[f"acc{k}"] = _masked_mean(jnp.argmax(logp, -1) == lab, m)
        metrics[f"alpha{k}"] = _masked_mean(acceptance(soft, logp), m)
    return total, metrics


def dflash_anchors(
    key, loss_mask: Bool[Array, "B T"], num: int
) -> tuple[Int[Array, "B A"], Bool[Array, "B A"]]:
    """`num` distinct random anchors per row among positions p with loss_mask[p] & loss_mask[p + 1]
    (rows with fewer such positions get invalid ones, flagged False)."""
    ok = loss_mask & jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    score = jnp.where(ok, jax.random.uniform(key, ok.shape), -1.0)
    top, idx = jax.lax.top_k(score, num)
    return idx.astype(jnp.int32), top >= 0


def dflash_loss(params, cfg: dflash.DFlashConfig, batch: Batch, t2d, key, num_anchors: int = 32,
                gamma: float = 7.0, weighting: str = "decay", loss: str = "ce",
                tap_final: int | None = None):  # fmt: skip
    b, t = batch.tokens.shape
    kb = cfg.block_size
    anchors, a_ok = dflash_anchors(key, batch.loss_mask, num_anchors)
    outs = dflash.train_forward(
        params, cfg, batch.tokens, tuple(batch.taps[str(x)] for x in cfg.taps), anchors
    )
    logp = jax.nn.log_softmax(dflash.draft_logits(params, cfg, outs[:, :, 1:]), -1)  # [B, A, K-1, Vd]
    tgt = anchors[:, :, None] + jnp.arange(1, kb)[None, None, :]  # predicted positions
    inside = tgt < t
    tgt_c = jnp.minimum(tgt, t - 1).reshape(b, -1)
    take = lambda x: jnp.take_along_axis(x, tgt_c, axis=1).reshape(tgt.shape)  # noqa: E731
    lab, ok = _labels(
        t2d, take(jnp.concatenate([batch.top1[:, :1], batch.top1[:, :-1]], 1))
    )  # top1[p + k - 1]
    m = ok & take(batch.loss_mask) & inside & a_ok[:, :, None]
    if loss == "ce":
        d = -jnp.take_along_axis(logp, jnp.maximum(lab, 0)[..., None], axis=-1)[..., 0]
    else:  # the target's distribution at p + k - 1 (soft targets from its final state)
        soft = soft_targets(params, batch, str(tap_final))
        soft = jnp.take_along_axis(soft, jnp.maximum(tgt_c - 1, 0)[..., None], axis=1).reshape(
            tgt.shape + (-1,)
        )
        d = divergence(soft, logp, loss)
    k = jnp.arange(kb - 1, dtype=jnp.float32)
    if weighting == "decay":
        w = jnp.broadcast_to(jnp.exp(-k / gamma), d.shape)
    elif weighting == "dpace":
        q = jnp.exp(-jax.lax.stop_gradient(jnp.where(m, -jnp.take_along_axis(
            logp, jnp.maximum(lab, 0)[..., None], axis=-1)[..., 0], 0.0)))  # fmt: skip
        pre = jnp.cumprod(0.5 * q + 0.5, axis=-1)
        w = jnp.flip(jnp.cumsum(jnp.flip(pre, -1), -1), -1)
        w = jax.lax.stop_gradient(w / w[..., :1])
    else:
        raise ValueError(f"unknown DFlash weighting {weighting!r}; choose decay or dpace")
    mf = m.astype(jnp.float32)
    total = jnp.sum(w * d * mf) / jnp.maximum(jnp.sum(w * mf), 1.0)
    hit = jnp.argmax(logp, -1) == lab
    metrics = {f"acc{j}": _masked_mean(hit[..., j], m[..., j]) for j in range(min(kb - 1, 8))}
    return total, metrics


def falcon_loss(params, cfg: falcon.FalconConfig, batch: Batch, t2d, key, noise: float = 0.1,
                loss: str = "ce", step=0, total_steps: int = 1):  # fmt: skip
    k = cfg.k
    tap = str(cfg.taps[0])
    f = batch.taps[tap].astype(jnp.float32)
    toks, pos, _ = _pairs(batch)  # pair i: position p = i + 1, token t_p, feature f_{p-1}
    b, n = toks.shape
    k_off, k_noise, k_glance = jax.random.split(key, 3)
    feat = f[:, :-1]
    if noise:
        feat = feat + jax.random.uniform(k_noise, feat.shape, minval=-noise, maxval=noise)
    offset = jax.random.randint(k_off, (), 0, k)
    mask = jnp.broadcast_to(falcon.block_mask(n, k, offset), (b, n, n))
    # The output at pair i (position p) predicts f_{p+k-1} = f[:, i + k], token p + k (label top1[i + k]).
    pad = lambda x, fill: jnp.concatenate([x, jnp.full((b, k) + x.shape[2:], fill, x.dtype)], axis=1)  # noqa: E731
    tgt = pad(f, 0.0)[:, k : k + n]
    lab, ok = _labels(t2d, pad(batch.top1, -1)[:, k : k + n])
    m = ok & pad(batch.loss_mask, False)[:, k + 1 : k + 1 + n]
    soft = pad(soft_targets(params, batch, tap), 0.0)[:, k : k + n]

    def objective(out):
        logp = jax.nn.log_softmax(eagle.draft_logits(params, cfg, out), -1)
        reg = jnp.sum(optax.huber_loss(out, tgt, delta=1.0), -1)
        total = _masked_mean(reg, m) / cfg.hidden_size + 0.1 * _masked_mean(divergence(soft, logp, loss), m)
        return total, logp

    out1 = falcon.sar_forward(params, cfg, toks, feat, pos, mask)
    loss1, logp1 = objective(out1)
    # CSGD: pass 1's drafted pairs (feature f̂_{p+k-1}, token t̂_{p+k}) become pass 2's input at p + k.
    d2t = params.get("d2t")
    guess = jnp.argmax(logp1, -1)
    guess = guess if d2t is None else d2t[guess]
    lagged = lambda x: jnp.concatenate([x[:, :k], x[:, : n - k]], axis=1)  # noqa: E731  (j >= k: x[j - k])
    pred_tok = lagged(guess.astype(toks.dtype))
    pred_feat = lagged(jax.lax.stop_gradient(out1))
    valid = jnp.arange(n)[None, :] >= k
    lam = 0.35 * (1.0 - jnp.minimum(step / total_steps, 1.0)) + 0.1
    tok2, feat2, _ = falcon.glance(
        k_glance, toks, feat, pred_tok, pred_feat, jnp.broadcast_to(valid, (b, n)), lam, k
    )
    loss2, logp2 = objective(falcon.sar_forward(params, cfg, tok2, feat2, pos, mask))
    # Slot j of a block (pair p with (p + offset) % k == j) predicts depth j + 1 of the pass that
    # block anchors: acc{j} reads as depth j + 1 in the chain τ estimate; glanced_acc is pass 2's.
    slot = (jnp.arange(n) + offset) % k
    hit = jnp.argmax(logp1, -1) == lab
    metrics = {f"acc{j}": _masked_mean(hit, m & (slot == j)) for j in range(k)}
    metrics["glanced_acc"] = _masked_mean(jnp.argmax(logp2, -1) == lab, m)
    return loss1 + loss2, metrics


# ------------------------------------------------------------------- SpecDec++ acceptance heads
def accept_label_hard(draft_token: Int[Array, "..."], target_top1: Int[Array, "..."]) -> Float[Array, "..."]:
    """Greedy (T = 0) label: 1 where the draft token (target ids) is the target's argmax, else 0."""
    return (draft_token == target_top1).astype(jnp.float32)


def accept_label_soft(logp: Float[Array, "..."], logq: Float[Array, "..."]) -> Float[Array, "..."]:
    """Sampling label: min(1, p(y) / q(y)) from the target's and the draft's log-probabilities of the
    draft token y (at the same temperature): speculative sampling's probability of accepting y."""
    return jnp.minimum(1.0, jnp.exp(logp - logq))


def accept_loss(logits: Float[Array, "... 2"], label: Float[Array, "..."], mask: Bool[Array, "..."],
                weight_mismatch: float = 6.0) -> Float[Array, ""]:  # fmt: skip
    """SpecDec++'s weighted binary cross-entropy on soft labels (official `train.py`): with the head's
    class probabilities σ0 (rejected), σ1 (accepted), label p and w = `weight_mismatch`,

        L = Σ [w (1 - p) (-log σ0) + p (-log σ1)] / Σ [w (1 - p) + p]

    over the counted positions (`mask`; e.g. token-mixing positions are not counted). Its minimiser
    is σ1 = p / (p + w (1 - p)): `accept_head.prob` undoes that bias at inference."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    m = mask.astype(jnp.float32)
    neg, pos = weight_mismatch * (1.0 - label) * m, label * m
    num = jnp.sum(neg * -logp[..., 0] + pos * -logp[..., 1])
    return num / jnp.maximum(jnp.sum(neg + pos), 1e-9)

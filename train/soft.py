"""Sorted Fine-Tuning (SoFT) of an S2D drafter's exits over teacher-forced target features.

Every exit learns the target's next token from the target's own residual stream after its layers
(the batch's tap `exits[i]`, HF numbering: the state entering layer `exits[i]`): at position p,
exit i's distribution over token p + 1 is pulled to the target's (cross-entropy to the
target's distribution: self-distillation), counted where token p + 1 is an answer token. The loss
is the mean of the per-exit losses (SoFT's sub-models weigh alike), plus `conf_weight` x the mean
binary cross-entropy of each exit's confidence against "this exit's argmax is the target's token"
(the label carries no gradient). The layers are the target's and stay frozen: only the exits'
norms, adapters and confidence heads train, so the features are all a step needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from specdec.drafters import s2d
from specdec.matmul import dense
from specdec.train.losses import Batch, _labels, _masked_mean, divergence, soft_targets


def exit_losses(params, cfg: s2d.S2DConfig, batch: Batch, t2d, *, eps: float, tap_final: str,
                loss: str = "ce", positions: Int[Array, "B K"] | None = None):  # fmt: skip
    """Per exit: (divergence to the target, confidence BCE, top-1 accuracy), each a masked mean over
    the positions p < T - 1 (predicting token p + 1), or over `positions` only (the head is the cost
    of every position: 3 exits over 49K tokens' logits)."""
    t = batch.top1.shape[1]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t - 1), (batch.top1.shape[0], t - 1))

    def at(x):  # x [B, T, ...] at the positions
        return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)

    p = soft_targets(params, batch.replace(taps={tap_final: at(batch.taps[tap_final])}), tap_final)
    lab, ok = _labels(t2d, at(batch.top1))
    mask = ok & jnp.take_along_axis(batch.loss_mask, positions + 1, axis=1)
    out = []
    for i, e in enumerate(cfg.exits):
        x = s2d.exit_states(params, i, at(batch.taps[str(e)]).astype(jnp.float32), eps)
        logq = jax.nn.log_softmax(dense(x, params["head"]), axis=-1)
        hit = jax.lax.stop_gradient((jnp.argmax(logq, -1) == lab).astype(jnp.float32))
        c = jnp.clip(s2d.confidence(params, i, x), 1e-6, 1 - 1e-6)
        bce = -(hit * jnp.log(c) + (1 - hit) * jnp.log1p(-c))
        d = divergence(p, logq, loss)
        out.append((_masked_mean(d, mask), _masked_mean(bce, mask), _masked_mean(hit, mask)))
    return out


def sample_positions(key, batch: Batch, k: int) -> Int[Array, "B K"]:
    """`k` positions per row drawn without replacement among those predicting an answer token."""
    t = batch.top1.shape[1]
    counted = batch.loss_mask[:, 1:] & (batch.top1[:, :-1] >= 0)
    score = jax.random.uniform(key, counted.shape) + counted.astype(jnp.float32)  # counted ones first
    return jax.lax.top_k(score, min(k, t - 1))[1]


def soft_loss(params, cfg: s2d.S2DConfig, batch: Batch, t2d, key=None, *, eps: float, tap_final: str,
              conf_weight: float = 0.1, loss: str = "ce", positions: int = 0):  # fmt: skip
    """SoFT: mean over exits of each exit's divergence, + `conf_weight` x mean confidence BCE;
    `positions` > 0: over that many random answer positions per row (`sample_positions`, `key`).
    Returns (loss, metrics: `acc_e{i}` each exit's top-1 agreement with the target, `ce_e{i}`,
    `bce_e{i}`; exits are alternatives, not a chain's depths: no `acc{k}` chain estimate)."""
    idx = sample_positions(key, batch, positions) if positions and key is not None else None
    per_exit = exit_losses(params, cfg, batch, t2d, eps=eps, tap_final=tap_final, loss=loss, positions=idx)
    m = len(per_exit)
    total = sum(d for d, _, _ in per_exit) / m + conf_weight * sum(b for _, b, _ in per_exit) / m
    metrics = {}
    for i, (d, b, acc) in enumerate(per_exit):
        metrics |= {f"acc_e{i}": acc, f"ce_e{i}": d, f"bce_e{i}": b}
    return total, metrics

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

from specdec.drafters import s2d
from specdec.matmul import dense
from specdec.train.losses import Batch, _labels, _masked_mean, divergence, soft_targets


def exit_losses(
    params, cfg: s2d.S2DConfig, batch: Batch, t2d, *, eps: float, tap_final: str, loss: str = "ce"
):
    """Per exit: (divergence to the target, confidence BCE, top-1 accuracy), each a masked mean."""
    p = soft_targets(params, batch, tap_final)[:, :-1]
    lab, ok = _labels(t2d, batch.top1[:, :-1])
    mask = ok & batch.loss_mask[:, 1:]
    out = []
    for i, e in enumerate(cfg.exits):
        x = s2d.exit_states(params, i, batch.taps[str(e)][:, :-1].astype(jnp.float32), eps)
        logq = jax.nn.log_softmax(dense(x, params["head"]), axis=-1)
        hit = jax.lax.stop_gradient((jnp.argmax(logq, -1) == lab).astype(jnp.float32))
        c = jnp.clip(s2d.confidence(params, i, x), 1e-6, 1 - 1e-6)
        bce = -(hit * jnp.log(c) + (1 - hit) * jnp.log1p(-c))
        out.append(
            (_masked_mean(divergence(p, logq, loss), mask), _masked_mean(bce, mask), _masked_mean(hit, mask))
        )
    return out


def soft_loss(params, cfg: s2d.S2DConfig, batch: Batch, t2d, key=None, *, eps: float, tap_final: str,
              conf_weight: float = 0.1, loss: str = "ce"):  # fmt: skip
    """SoFT: mean over exits of each exit's divergence, + `conf_weight` x mean confidence BCE.
    Returns (loss, metrics: `acc{i}` each exit's top-1 agreement, `ce{i}`, `bce{i}`)."""
    del key
    per_exit = exit_losses(params, cfg, batch, t2d, eps=eps, tap_final=tap_final, loss=loss)
    m = len(per_exit)
    total = sum(d for d, _, _ in per_exit) / m + conf_weight * sum(b for _, b, _ in per_exit) / m
    metrics = {}
    for i, (d, b, acc) in enumerate(per_exit):
        metrics |= {f"acc{i}": acc, f"ce{i}": d, f"bce{i}": b}
    return total, metrics

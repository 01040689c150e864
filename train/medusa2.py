"""Medusa-2's joint objective: the heads' loss plus the backbone's self-distillation to the original.

The backbone's last `K` layers and its final norm train with the Medusa heads (the rest of the
target stays frozen, so the batch's tap L - K, the residual stream entering layer L - K, is all a
step runs from). At position p the fine-tuned backbone's next-token distribution is pulled to the
original model's (KL(original || fine-tuned) over the full vocabulary, the original's from the
cached final state, tap L) and head k, reading the fine-tuned final state, learns token p + k + 2
(the original's greedy token there, weights 0.8^k, as Medusa-1):

    L = KL + lambda(t) * sum_k 0.8^k CE_k,     lambda(t) = heads_weight * sin(pi/2 * min(1, t / steps))

(the heads' weight rises on a sine over the run: the backbone is not pulled by heads far from
trained while it starts moving; with heads from a Medusa-1 run, stage 1, they are trained already).
Both terms are counted over `positions` random answer positions per row (each costs a full-vocabulary
head for the KL and the heads' draft-vocabulary heads). Metrics: `kl`, `agree` (the fine-tuned
argmax = the original's), `nll`/`nll_orig` (the next data token's negative log-likelihood under
each: the perplexity drift), `acc{k}` per head (the chain estimate `tau_est` reads them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from specdec.cache import causal_mask
from specdec.drafters import medusa
from specdec.drafters.medusa2 import Medusa2Config
from specdec.matmul import dense
from specdec.models import decoder
from specdec.models.config import ModelConfig
from specdec.models.decoder import rms_norm
from specdec.models.rope import rope_tables
from specdec.train.losses import Batch, _labels, _masked_mean
from specdec.train.soft import sample_positions


def backbone_states(bparams, tcfg: ModelConfig, h: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    """The fine-tuned last layers (`bparams["layers"]`, stacked `[K, ...]`, plain layout) over the
    residual stream `h` entering them (teacher-forced, causal), then the final norm."""
    b, t, _ = h.shape
    rope = rope_tables(tcfg, jnp.broadcast_to(jnp.arange(t), (b, t)))
    mask = causal_mask(b, t)
    k = jax.tree.leaves(bparams["layers"])[0].shape[0]
    for i in range(k):
        lp = jax.tree.map(lambda x, i=i: x[i], bparams["layers"])
        h, _ = decoder.layer(lp, tcfg, h, rope, mask, None, 0, norm="attn_norm")
    return rms_norm(h, bparams["final_norm"], tcfg.rms_norm_eps)


def _heads_at(logits: Float[Array, "B P K Vd"], idx: Int[Array, "B P"], batch: Batch, t2d):
    """Head k at position p predicts token p + k + 2: label top1[p + k + 1], counted where token
    p + k + 2 is an answer token (`losses.heads_loss` at sampled positions)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    t = batch.tokens.shape[1]
    total, metrics = 0.0, {}
    for k in range(logits.shape[2]):
        at = jnp.minimum(idx + k + 1, t - 1)
        lab, ok = _labels(t2d, jnp.take_along_axis(batch.top1, at, axis=1))
        m = ok & (idx + k + 2 < t) & jnp.take_along_axis(batch.loss_mask, jnp.minimum(at + 1, t - 1), axis=1)
        ce = -jnp.take_along_axis(logp[:, :, k], jnp.maximum(lab, 0)[..., None], axis=-1)[..., 0]
        total = total + 0.8**k * _masked_mean(ce, m)
        metrics[f"acc{k}"] = _masked_mean(jnp.argmax(logp[:, :, k], -1) == lab, m)
    return total, metrics


def heads_weight_at(step, steps: int, heads_weight: float):
    """lambda(t): the heads' weight, rising on a sine over the run's `steps`."""
    return heads_weight * jnp.sin(0.5 * math.pi * jnp.minimum(1.0, step / max(steps, 1)))


def medusa2_loss(params, cfg: Medusa2Config, tcfg: ModelConfig, batch: Batch, t2d, key=None, step=None, *,
                 steps: int, heads_weight: float = 0.2, positions: int = 128):  # fmt: skip
    """Medusa-2's loss (module docstring) and metrics. `params`: the trainable "backbone" {layers,
    final_norm} and heads {w, b}, plus the frozen "head" (the target's head at the draft vocabulary)
    and "full_head" ([D, V]); `step` None (held-out evaluation) weighs the heads fully."""
    L = tcfg.num_layers
    h0 = batch.taps[str(L - cfg.backbone_layers)].astype(jnp.float32)
    f = backbone_states(params["backbone"], tcfg, h0)
    if key is None:
        key = jax.random.PRNGKey(0)
    idx = sample_positions(key, batch, positions) if positions else None
    if idx is None:
        t = batch.tokens.shape[1]
        idx = jnp.broadcast_to(jnp.arange(t - 1), (batch.tokens.shape[0], t - 1))

    def at(x):
        return jnp.take_along_axis(x, idx[..., None], axis=1)

    fs, orig = at(f), at(batch.taps[str(L)]).astype(jnp.float32)
    logq = jax.nn.log_softmax(dense(fs, params["full_head"]), axis=-1)
    logp = jax.nn.log_softmax(dense(orig, params["full_head"]), axis=-1)
    t = batch.tokens.shape[1]
    mask = jnp.take_along_axis(batch.loss_mask, jnp.minimum(idx + 1, t - 1), axis=1)
    kl = _masked_mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1), mask)
    nxt = jnp.take_along_axis(batch.tokens, jnp.minimum(idx + 1, t - 1), axis=1)[..., None]
    heads_loss, metrics = _heads_at(medusa.head_logits(params, cfg.medusa, fs), idx, batch, t2d)
    lam = heads_weight if step is None else heads_weight_at(step, steps, heads_weight)
    metrics |= {
        "kl": kl, "heads": heads_loss,
        "agree": _masked_mean(jnp.argmax(logq, -1) == jnp.argmax(logp, -1), mask),
        "nll": _masked_mean(-jnp.take_along_axis(logq, nxt, axis=-1)[..., 0], mask),
        "nll_orig": _masked_mean(-jnp.take_along_axis(logp, nxt, axis=-1)[..., 0], mask),
    }  # fmt: skip
    return kl + lam * heads_loss, metrics

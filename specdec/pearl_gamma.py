"""Choosing PEARL's γ (draft tokens per round) from measured step times, as nano-PEARL does: γ
draft steps should take about one target step, so neither side of the pipeline waits long."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from specdec.attention import flash_size
from specdec.cache import KVCache, causal_mask
from specdec.models.config import ModelConfig
from specdec.models.llama import forward


@dataclasses.dataclass(frozen=True)
class GammaProfile:
    """γ = max(1, round(target_step_s / draft_step_s)): γ draft steps take about one target step."""

    gamma: int
    target_step_s: float
    draft_step_s: float


def profile_gamma(params, cfg: ModelConfig, drafter, draft_params, *, batch: int = 1, context: int = 256,
                  steps: int = 10, devices: tuple | None = None) -> GammaProfile:  # fmt: skip
    """Measure one-token steps of the target and the draft (each alone, on its device when
    `devices` = (draft device, target device)) over a cache of `context` tokens and set γ to their
    ratio (nano-PEARL's rule). The two are timed alternately, `steps` times after two warm-up calls,
    and the fastest of each is kept: a busy machine slows single calls, not the fastest one."""
    size = context + 16
    if "flash" in (cfg.attention, drafter.cfg.attention):  # a size the flash kernel tiles
        size = flash_size(size)

    def one_step(p, mcfg, device):
        cache = KVCache.init(mcfg, batch, size).advance(jnp.full((batch,), context, jnp.int32))
        toks = jnp.ones((batch, 1), jnp.int32)
        if device is not None:
            cache, toks = jax.device_put((cache, toks), device)
        pos = jnp.full((batch, 1), context, jnp.int32)
        fn = jax.jit(lambda p, t, c: forward(p, mcfg, t, pos, c, causal_mask(batch, 1))[0])
        run = lambda: jax.block_until_ready(fn(p, toks, cache))
        run(), run()
        return run

    d_dev, t_dev = devices if devices is not None else (None, None)
    runs = (one_step(params, cfg, t_dev), one_step(draft_params, drafter.cfg, d_dev))
    best = [float("inf"), float("inf")]
    for _ in range(steps):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - t0)
    t_s, d_s = best
    return GammaProfile(max(1, round(t_s / d_s)), t_s, d_s)

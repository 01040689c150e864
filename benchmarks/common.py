"""Helpers shared by the benchmark scripts: timing, machine description, one loop step's cost."""

from __future__ import annotations

import json
import os
import statistics
import time


def timed(fn):
    """(fn(), seconds it took)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def write_json(result: dict, out: str | None) -> None:
    """Print `result` and write it to `out` (when given)."""
    print(json.dumps(result, indent=2, default=float))
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=float)


def prefilled(params, cfg, prompt, n_new: int, drafter=None, dparams=None, builder=None):
    """(spec, decode state right after prefilling `prompt`, eos, max_new) for greedy decoding."""
    import jax
    import jax.numpy as jnp

    from specdec.decode import prefill_jit
    from specdec.generate import make_spec, pad_prompts
    from specdec.sampling import SamplingConfig

    spec = make_spec(cfg, SamplingConfig(), drafter, builder, None)
    toks, lens, size = pad_prompts([prompt], cfg, n_new, None, spec.cache_window)
    eos, max_new = jnp.asarray([-1], jnp.int32), jnp.int32(n_new)
    toks, lens = jnp.asarray(toks), jnp.asarray(lens)
    state = prefill_jit(
        params, dparams, toks, lens, jax.random.key(0), eos, max_new, spec=spec, cache_size=size
    )
    return spec, state, eos, max_new


def loop_step_seconds(params, cfg, prompt, n_new: int, drafter=None, dparams=None, builder=None, *,
                      steps: int = 16, repeats: int = 5) -> float:  # fmt: skip
    """Seconds per step of the on-device loop: `steps` steps after prefill, median of `repeats`."""
    import jax
    import jax.numpy as jnp

    from specdec.decode import loop_jit

    spec, state, eos, max_new = prefilled(params, cfg, prompt, n_new, drafter, dparams, builder)
    run = lambda: jax.block_until_ready(
        loop_jit(params, dparams, jax.tree.map(jnp.copy, state), eos, max_new, jnp.int32(steps), spec=spec)
    )
    run()
    return statistics.median(timed(run)[1] for _ in range(repeats)) / steps

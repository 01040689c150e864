"""Host driver of the decode loop: pad and bucket prompts, run prefill + loop, collect outputs.

Shapes are bucketed so new prompts do not recompile: the prompt block is padded to a power of two
(>= 16; past 1,024 tokens, to a multiple of 1,024: `prompt_block`), the output budget to a power of
two, and the cache holds both plus the tree window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specdec import invariants, sharding
from specdec import trace as step_trace
from specdec.attention import flash_size, flash_splits
from specdec.compose import CompositionError, make_spec
from specdec.decode import Spec, _running, loop_jit, prefill_jit, step_jit
from specdec.models.config import ModelConfig
from specdec.models.llama import Params
from specdec.prefix_sharing import expand_samples, plan_sharing, shared_prompt
from specdec.sampling import SamplingConfig

log = logging.getLogger("specdec")

__all__ = [
    "CompositionError", "GenerateOutput", "InvariantError", "PromptTooLongError", "generate", "make_spec",
    "pad_prompts", "warmup",
]  # fmt: skip


class PromptTooLongError(ValueError):
    """A prompt (plus the tokens to generate) does not fit the model context or the cache."""


class InvariantError(ValueError):
    """`generate(..., check=True)` found a broken tree or loop invariant (`specdec.invariants`): a
    drafter or builder produced a value the loop cannot use (the CLIs print it as one line)."""


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    tokens: list[list[int]]  # new tokens per row, EOS included when it was produced
    finished: list[bool]  # row stopped at EOS (False: stopped at max_new_tokens)
    steps: int  # decode-loop target forwards (prefill excluded)
    row_steps: list[int]  # target forwards while each row was running
    accepted_hist: list[int]  # row-steps by tokens emitted in the step: index k = k tokens
    draft_calls: int = 0  # drafter calls (begin + expands) over all steps
    verify_width: int = 0  # verification block widths (tokens per row) summed over steps
    prefill_seconds: float = 0.0  # wall time of the prefill (target and drafter), before the loop
    shared_tokens: int = 0  # prompt tokens not prefilled or stored again: shared prefixes (Hydragen)

    @property
    def tau(self) -> float:
        """Mean tokens per target forward, bonus included (AR = 1.0); prefill's token excluded."""
        n = sum(self.row_steps)
        return sum(k * c for k, c in enumerate(self.accepted_hist)) / n if n else float("nan")

    @property
    def acceptance_per_depth(self) -> list[float]:
        """Fraction of row-steps whose accepted path reached depth d, for d = 1..max_depth."""
        n = sum(self.accepted_hist)
        return [
            sum(self.accepted_hist[d + 1 :]) / n if n else float("nan")
            for d in range(1, len(self.accepted_hist) - 1)
        ]


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum): the padded size that keeps compiled shapes few."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def prompt_block(n: int) -> int:
    """The padded prompt block of a longest prompt of `n` tokens: `bucket(n)` up to 1,024, then the
    next multiple of 1,024 (a 5.9K-token prompt pads to 6,144, not 8,192: prefill time grows
    faster than linearly; chunked prefill compiles one body whatever the length)."""
    return bucket(n) if n <= 1024 else -(-n // 1024) * 1024


def pad_prompts(
    prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int, cache_size: int | None = None,
    window: int = 1,
) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """Right-pad prompts to a bucketed block and choose the cache size.

    Returns (tokens [B, T], lengths [B], cache_size). The cache holds the padded prompt block, the
    bucketed output budget and a tree `window`, rounded up to a size the flash kernel tiles when
    `cfg.attention == "flash"`. Raises PromptTooLongError when a prompt plus
    `max_new_tokens` exceeds the model context or an explicit `cache_size`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (got an empty prompt or no prompts)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lens = np.array([len(p) for p in prompts], np.int32)
    longest = int(lens.max())
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise PromptTooLongError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {cfg.max_position_embeddings} tokens; shorten the prompt or lower max_new_tokens"
        )
    t = prompt_block(longest)
    needed = max(t, longest + max_new_tokens) + window
    if cache_size is not None and cache_size < needed:
        raise PromptTooLongError(
            f"cache_size={cache_size} cannot hold a prompt of {longest} tokens plus "
            f"max_new_tokens={max_new_tokens} and a tree window of {window}; use cache_size >= {needed} "
            "or a shorter prompt"
        )
    if cache_size is None:
        cache_size = t + bucket(max_new_tokens) + window
        if cfg.attention == "flash":  # a size the kernel tiles (`attend_split` refuses any other)
            cache_size = flash_size(cache_size)
    elif cfg.attention == "flash" and flash_splits(cache_size) is None:
        raise PromptTooLongError(
            f"cache_size={cache_size} does not tile the flash attention kernel; use cache_size="
            f"{flash_size(cache_size)} (or leave it unset)"
        )
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lens, cache_size


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    drafter=None,
    draft_params=None,
    builder=None,
    verifier=None,
    eos_ids: Sequence[int] | None = None,
    seed: int = 0,
    loop: str = "device",
    cache_size: int | None = None,
    mesh=None,
    check: bool = False,
    trace: str | None = None,
    speculator=None,
    gamma: int | None = None,
    roles: tuple | None = None,
    num_samples: int = 1,
    shared_prefix: str = "auto",
) -> GenerateOutput:
    """Generate for a batch of prompts of different lengths; speculative when a drafter is given.

    `num_samples` continuations of each prompt: the rows are the prompts each repeated that many
    times, consecutively (sample j of prompt i is output row i * num_samples + j). `shared_prefix`:
    "auto" finds prompt prefixes shared by contiguous rows (`specdec.prefix_sharing`: one level
    over all rows, one over equal-size groups) and prefills and stores each once per group,
    attention reading it once for all the group's rows (Hydragen); "off" gives every row its own
    copy. Outputs are the same either way up to float rounding.

    `params` are device params (`specdec.models.to_device`); `drafter`/`draft_params`/`builder`
    follow `specdec.drafters` and `specdec.trees`. `verifier` defaults to `specdec.verifiers.auto`
    (picks the lossless verifier that fits the tree's sibling mode). `eos_ids` defaults to the
    model's. `loop`: "device" (one `lax.while_loop`), "python" (host loop, same jitted step) or
    "pearl" (below).
    `mesh` (`specdec.sharding`): `params` and `cfg` from `sharding.shard_params` on that mesh; rows
    are split over its `data` axis (padded to a multiple of it with finished rows), drafter params
    replicated. Outputs equal the unsharded run's up to float rounding of the sharded reductions.
    The composition is validated first (`specdec.compose.make_spec`: a bad one raises
    `CompositionError`). `check=True` runs the tree and loop invariants of `specdec.invariants`
    every step and raises `InvariantError` with the step and row of the first broken one; `trace`
    (a path) writes one JSON line per step and running row (`specdec.trace`). `speculator`
    (`specdec.speculator`) stands for `drafter`, `draft_params`, `builder` and `verifier` at once.

    `loop="pearl"` decodes with PEARL (`specdec.pearl`): `drafter` a token-level draft model
    (`layer_skip` or a small model), `gamma` draft tokens per round, no builder or verifier (it
    drafts a chain and verifies it itself); `roles` = (draft device, target device) runs the draft
    and the target rounds concurrently on two devices (`specdec.pearl_mesh`). Returns a
    `specdec.pearl.PearlOutput` (a GenerateOutput with per-round records).
    """
    prompts = expand_samples(prompts, num_samples)
    if shared_prefix not in ("auto", "off"):
        raise ValueError(f"shared_prefix must be 'auto' or 'off', got {shared_prefix!r}")
    if loop == "pearl" or roles is not None or gamma is not None:
        _check_pearl(loop, gamma, roles, drafter, builder, verifier, speculator, mesh, check, trace)
        from specdec.pearl import pearl_generate

        if shared_prefix == "auto" and plan_sharing(prompts) is not None:
            _note_once("PEARL decodes without prefix sharing: every row prefills and reads its own prefix")
        return pearl_generate(params, cfg, prompts, drafter=drafter, draft_params=draft_params, gamma=gamma,
                              max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids, seed=seed,
                              cache_size=cache_size, devices=roles)  # fmt: skip
    drafter, draft_params, builder, verifier = _unbundle(speculator, drafter, draft_params, builder, verifier)
    spec = make_spec(cfg, sampling, drafter, builder, verifier, mesh, check=check, trace=trace is not None)
    return _run(params, draft_params, spec, prompts, max_new_tokens, max_new_tokens, eos_ids, seed, loop,
                cache_size, trace, shared_prefix)  # fmt: skip


def warmup(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           sampling: SamplingConfig = SamplingConfig(), drafter=None, draft_params=None, builder=None,
           verifier=None, loop: str = "device", cache_size: int | None = None,
           mesh=None, speculator=None, check: bool = False, gamma: int | None = None,
           roles: tuple | None = None, num_samples: int = 1,
           shared_prefix: str = "auto") -> None:  # fmt: skip
    """Compile everything `generate` with these arguments would, running a single step."""
    prompts = expand_samples(prompts, num_samples)
    if loop == "pearl" or roles is not None or gamma is not None:
        _check_pearl(loop, gamma, roles, drafter, builder, verifier, speculator, mesh, check, None)
        from specdec.pearl import pearl_generate

        pearl_generate(params, cfg, prompts, drafter=drafter, draft_params=draft_params, gamma=gamma,
                       max_new_tokens=max_new_tokens, sampling=sampling, cache_size=cache_size, devices=roles,
                       limit=1)  # fmt: skip
        return
    drafter, draft_params, builder, verifier = _unbundle(speculator, drafter, draft_params, builder, verifier)
    spec = make_spec(cfg, sampling, drafter, builder, verifier, mesh, check=check)
    _run(params, draft_params, spec, prompts, max_new_tokens, 1, None, 0, loop, cache_size,
         shared_prefix=shared_prefix)  # fmt: skip


@functools.cache
def _note_once(message: str) -> None:
    log.warning("specdec: %s", message)


def _sharing(prompts, spec: Spec, mode: str, max_new_tokens: int):
    """The shared-prefix prefill input for `prompts` (`specdec.prefix_sharing`), or None: `mode`
    "off", nothing worth sharing, or a run that cannot share (named once in the log)."""
    if mode == "off":
        return None
    if mode != "auto":
        raise ValueError(f"shared_prefix must be 'auto' or 'off', got {mode!r}")
    plan = plan_sharing(prompts)
    if plan is None:
        return None
    if spec.mesh is not None or spec.cfg.sliding_window is not None:
        why = "on a mesh" if spec.mesh is not None else "with a sliding attention window"
        _note_once(f"prompts share prefixes, but decoding {why} gives every row its own copy of them")
        return None
    shared = shared_prompt(prompts, plan, bucket(max_new_tokens) + spec.cache_window, prompt_block)
    if spec.cfg.attention == "flash":  # the own segments' size must tile the kernel
        shared = shared.replace(unique_size=flash_size(shared.unique_size))
    return shared, plan


def _check_pearl(loop, gamma, roles, drafter, builder, verifier, speculator, mesh, check, trace) -> None:
    """Refuse what `loop="pearl"` cannot take, naming the fix (CompositionError)."""
    if loop != "pearl":
        what = "gamma" if gamma is not None else "roles"
        raise CompositionError(f"{what}= belongs to PEARL; pass loop='pearl' (got loop={loop!r})")
    if drafter is None or speculator is not None:
        raise CompositionError("loop='pearl' needs drafter= (a token-level draft model, e.g. layer_skip) "
                               "and draft_params=, not speculator=")  # fmt: skip
    if builder is not None or verifier is not None:
        raise CompositionError("loop='pearl' drafts a chain of gamma tokens and verifies it itself; pass no "
                               "builder or verifier")  # fmt: skip
    if gamma is None:
        raise CompositionError("loop='pearl' needs gamma= (draft tokens per round; "
                               "specdec.pearl_gamma.profile_gamma measures one)")  # fmt: skip
    if mesh is not None:
        raise CompositionError("loop='pearl' runs each model whole on one device: pass roles=(draft device, "
                               "target device) instead of mesh=")  # fmt: skip
    if check or trace:
        raise CompositionError("check= and trace= follow the standard loop's trees; loop='pearl' records "
                               "its rounds in PearlOutput.round_tokens / round_modes instead")  # fmt: skip


def _unbundle(speculator, drafter, draft_params, builder, verifier):
    if speculator is None:
        return drafter, draft_params, builder, verifier
    if any(x is not None for x in (drafter, draft_params, builder, verifier)):
        raise CompositionError("pass either speculator= or drafter/draft_params/builder/verifier, not both")
    return speculator.drafter, speculator.params, speculator.builder, speculator.verifier


def _run(params, dparams, spec: Spec, prompts, max_new_tokens, limit, eos_ids, seed, loop, cache_size,
         trace=None, shared_prefix="auto"):  # fmt: skip
    if loop not in ("device", "python"):
        raise ValueError(f"loop must be 'device', 'python' or 'pearl', got {loop!r}")
    n_rows = len(prompts)
    pad = -n_rows % sharding.data_size(spec.mesh)  # rows split evenly over the data axis
    prompts = list(prompts) + [prompts[-1]] * pad if pad else prompts
    tokens, lens, cache_size = pad_prompts(prompts, spec.cfg, max_new_tokens, cache_size, spec.cache_window)
    shared, plan = _sharing(prompts, spec, shared_prefix, max_new_tokens) or (None, None)
    eos = jnp.asarray(list(spec.cfg.eos_token_ids if eos_ids is None else eos_ids) or [-1], jnp.int32)
    max_new = jnp.int32(max_new_tokens)
    stop = jnp.int32(limit)  # loop steps; traced, so a 1-step warm-up compiles the same programs
    if spec.mesh is not None:  # drafter params already on the mesh (replicate once, outside) stay put
        tokens_d, lens_d = (sharding.place(x, sharding.rows(spec.mesh, x.ndim)) for x in (tokens, lens))
        dparams = sharding.replicate(dparams, spec.mesh)
    else:
        tokens_d, lens_d = jnp.asarray(tokens), jnp.asarray(lens)
    # traced under the run's mesh: per-shard kernels (`attention.prefix_flash`) read it from context
    with jax.set_mesh(spec.mesh) if spec.mesh is not None else contextlib.nullcontext():
        trace_steps = max_new_tokens if spec.trace else 0  # a decode takes at most max_new steps
        t0 = time.perf_counter()
        state = prefill_jit(params, dparams, tokens_d, lens_d, jax.random.key(seed), eos, max_new, shared,
                            spec=spec, cache_size=cache_size, trace_steps=trace_steps)  # fmt: skip
        jax.block_until_ready(state)  # the prefill's own wall time, apart from the loop's
        prefill_seconds = time.perf_counter() - t0
        if pad:  # padding rows are finished before the first step: no forwards or tokens counted
            state = state.replace(done=state.done.at[n_rows:].set(True))
        if loop == "device":
            state = loop_jit(params, dparams, state, eos, max_new, stop, spec=spec)
        else:
            while bool(_running(state, stop)):
                state = step_jit(params, dparams, state, eos, max_new, spec=spec)
    steps = int(sharding.fetch(state.steps))
    if trace is not None:  # before the invariant check: the trace shows the steps leading to it
        step_trace.write(trace, jax.tree.map(sharding.fetch, state.records), steps, n_rows)
    if spec.check:
        step, row, code = (int(x) for x in sharding.fetch(state.error))
        if code:
            name = invariants.CODES[code]
            raise InvariantError(
                f"step {step}, row {row}: invariant '{name}' broken: {invariants.EXPLAIN[name]}"
            )
    toks, length = sharding.fetch(state.tokens), sharding.fetch(state.length)
    rows = [toks[i, lens[i] : length[i]].tolist() for i in range(n_rows)]
    eos_set = set(np.asarray(eos).tolist())
    return GenerateOutput(
        tokens=rows,
        finished=[bool(r) and r[-1] in eos_set for r in rows],
        steps=steps,
        row_steps=sharding.fetch(state.row_steps)[:n_rows].tolist(),
        accepted_hist=sharding.fetch(state.accepted_hist).tolist(),
        draft_calls=int(sharding.fetch(state.draft_calls)),
        verify_width=int(sharding.fetch(state.verify_width)),
        prefill_seconds=prefill_seconds,
        shared_tokens=plan.saved_tokens if plan is not None else 0,
    )

"""PEARL on two devices: the draft round on one, the target round on the other, concurrently.

Host-driven MPMD (multiple programs, multiple data): four jitted programs of `specdec.pearl`, each
pinned to its device by where its inputs live, dispatched asynchronously every round:

    draft device    draft_round(receive(draft, message))            -> proposal (s [B,γ] int32, q [B,γ,V])
    target device   target_forward(target)                          -> logits, cache
    proposal ---------------------------------------------------------> target device
    target device   settle(target, logits, cache, proposal)         -> target', message (root, length int32)
    message <---------------------------------------------------------- draft device

The draft's γ steps and the target's forward of round i have no data dependency, so the two devices
run them at the same time; the verdict is computed once, on the target device, and only small
arrays cross (token ids as int32 arrays of their own, never packed into floats). The host never
waits inside a round: it checks whether every row is finished every `CHECK_EVERY` rounds (extra
rounds past the end change nothing: finished rows are frozen). Both sides derive their randomness
from the seed by `fold_in(key, round)`, so the tokens equal the single-device loop's.

`--mesh draft=1,target=1` names this layout on the CLIs (`parse_roles`); on CPU,
`XLA_FLAGS=--xla_force_host_platform_device_count=2` gives the two devices.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # imported where used: the CLIs read `is_role_spec` before any model code loads
    from specdec import pearl as P

CHECK_EVERY = 4  # rounds dispatched between two host checks of "all rows finished"
ROLES = ("draft", "target")


class RoleError(ValueError):
    """A role layout this machine or PEARL cannot take."""


def is_role_spec(spec: str | None) -> bool:
    """Whether a --mesh value names PEARL roles (draft=..,target=..) rather than data/model axes."""
    return bool(spec) and any(part.partition("=")[0].strip() in ROLES for part in spec.split(","))


def parse_roles(spec: str, devices=None) -> tuple:
    """`"draft=1,target=1"` -> (draft device, target device): the first two devices, in that order.

    Each model runs whole on one device (tensor parallelism inside a role is not supported), so both
    sizes must be 1. Raises RoleError on bad syntax, other sizes or fewer than two devices."""
    sizes = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in ROLES or name in sizes or not value.strip().isdigit():
            raise RoleError(f"mesh {spec!r}: PEARL roles are written draft=1,target=1")
        sizes[name] = int(value)
    if sizes != {"draft": 1, "target": 1}:
        raise RoleError(
            f"mesh {spec!r}: PEARL places the draft model and the target on one device each; use "
            "--mesh draft=1,target=1"
        )
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < 2:
        raise RoleError(
            f"mesh {spec!r} needs 2 devices but {len(devices)} is visible (on CPU, "
            "XLA_FLAGS=--xla_force_host_platform_device_count=2 gives two)"
        )
    return devices[0], devices[1]


@functools.lru_cache(maxsize=8)
def _programs(pearl: P.Pearl, cache_size: int, rounds: int):
    """The jitted programs of one recipe (each runs where its committed inputs live)."""
    from specdec import pearl as P

    prefill_t = jax.jit(functools.partial(P.prefill_target, pearl, cache_size=cache_size, rounds=rounds))
    prefill_d = jax.jit(functools.partial(P.prefill_draft, pearl, cache_size=cache_size))
    draft = jax.jit(lambda dp, d, msg: P.draft_round(pearl, dp, P.receive(d, msg)), donate_argnums=(1,))
    # the target cache is donated to the forward (written in place), the rest of the state kept
    target = jax.jit(lambda p, t, c: P.target_forward(pearl, p, t.replace(cache=c)), donate_argnums=(2,))
    settle = jax.jit(functools.partial(P.settle, pearl), donate_argnums=(0, 2))
    return prefill_t, prefill_d, draft, target, settle


def run_two_devices(pearl: P.Pearl, params, dparams, tokens, lens, key, eos, max_new_tokens: int, *,
                    cache_size: int, rounds: int, stop: int, devices: tuple) -> P.TargetSide:  # fmt: skip
    """Prefill and run PEARL rounds with the draft on devices[0] and the target on devices[1] until
    every row is finished or `stop` rounds ran; returns the final target state (on its device).

    `params` / `dparams` are moved to their devices (a no-op when already there: place them once
    with `jax.device_put` to keep repeated calls cheap)."""
    d_dev, t_dev = devices
    if d_dev == t_dev:
        raise RoleError("the draft and the target need two different devices")
    prefill_t, prefill_d, draft_fn, target_fn, settle_fn = _programs(pearl, cache_size, rounds)
    params = jax.device_put(params, t_dev)
    dparams = jax.device_put(dparams, d_dev)
    put_t = lambda x: jax.device_put(x, t_dev)
    put_d = lambda x: jax.device_put(x, d_dev)
    eos_t, max_new = put_t(jnp.asarray(eos)), put_t(jnp.int32(max_new_tokens))
    target, msg = prefill_t(params, put_t(tokens), put_t(lens), put_t(key), eos_t, max_new)
    draft = prefill_d(dparams, put_d(tokens), put_d(lens), put_d(key))
    msg = put_d(msg)
    done_rounds = 0
    while done_rounds < stop:
        for _ in range(min(CHECK_EVERY, stop - done_rounds)):
            draft, prop = draft_fn(dparams, draft, msg)  # draft device
            cache = target.cache
            target = target.replace(cache=None)
            logits, cache = target_fn(params, target, cache)  # target device, concurrently
            target, msg = settle_fn(target, logits, cache, put_t(prop), eos_t, max_new)
            msg = put_d(msg)
            done_rounds += 1
        if bool(jnp.all(target.done)):
            break
    return target

"""Shared prompt prefixes (Hydragen): find them among a batch's prompts, prefill them once.

Many rows often begin with the same tokens: N samples of one prompt, many questions after one
document, one system prompt before every conversation. `plan_sharing` finds up to two levels of
such prefixes among contiguous rows — one shared by all rows, then one per equal-size group of
consecutive rows — and `prefill_shared` prefills each level once per group (each level attending
the levels above it), then every row's own suffix after its prefix. The decode loop then runs on a
`KVCache` whose `shared` levels hold the prefixes (`specdec.cache`): attention reads a group's
prefix once for all its rows (`specdec.attention.attend_shared`) and nothing in the loop writes
it. Outputs equal the unshared decode's up to float rounding (attention sums in another order).

A row always keeps at least one token of its prompt in its own segment (the prompt's last token,
whose logits start decoding), so N samples of one prompt share all of it but that token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from specdec.cache import KVCache, SharedSegment
from specdec.models.config import ModelConfig
from specdec.models.llama import Params, prefill

# Share a level only when it spares at least this many prefix tokens per row that joins a group
# (below it, a level's extra attention part and merge per layer cost more than the reads saved).
MIN_SHARED = 64


@flax.struct.dataclass
class SharedPrompt:
    """A batch's prompts cut into shared levels and per-row suffixes (device arrays).

    `level_tokens[l] [G_l, P_l]` / `level_lens[l] [G_l]`: the prefix tokens of each group of level
    l, after those of the levels above (G_l divides B, each level's groups nest in the one above's);
    `suffix [B, U]` / `suffix_lens [B]` (>= 1): each row's own prompt tokens after its prefix.
    `unique_size`: slots of each row's own cache segment (suffix, outputs, tree window)."""

    level_tokens: tuple[Int[Array, "G P"], ...]
    level_lens: tuple[Int[Array, " G"], ...]
    suffix: Int[Array, "B U"]
    suffix_lens: Int[Array, " B"]
    unique_size: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(t.shape[0] for t in self.level_tokens)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Host-side result of `plan_sharing`: per level (group size in rows, shared length per group)."""

    group_rows: tuple[int, ...]  # rows per group, outermost level first (each divides the one before)
    lengths: tuple[tuple[int, ...], ...]  # per level, tokens each group shares beyond the levels above

    def base(self, row: int) -> int:
        """Prefix tokens row `row` shares (all levels)."""
        return sum(lens[row // g] for g, lens in zip(self.group_rows, self.lengths, strict=True))

    @property
    def saved_tokens(self) -> int:
        """Prefix tokens not prefilled or stored again: sum over groups of (rows - 1) x shared length."""
        return sum((g - 1) * sum(lens) for g, lens in zip(self.group_rows, self.lengths, strict=True))


def _lcp(prompts: Sequence[Sequence[int]]) -> int:
    """Longest common prefix of the prompts, capped so every prompt keeps one token of its own."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for i in range(n):
        if any(p[i] != first[i] for p in prompts[1:]):
            return i
    return max(n, 0)


def plan_sharing(prompts: Sequence[Sequence[int]], min_shared: int = MIN_SHARED) -> Plan | None:
    """Shared prefixes among contiguous rows: a level shared by all rows (when their common prefix
    has >= `min_shared` tokens), then the equal-size grouping of consecutive rows (sizes dividing
    the batch) that spares most tokens beyond it, when its groups share >= `min_shared` more tokens
    on average. None when nothing is worth sharing (one row, or short common prefixes).

    Rows are not reordered: put prompts that share a prefix next to each other (as
    `generate(num_samples=N)` does), in equal-size groups."""
    b = len(prompts)
    if b < 2:
        return None
    sizes, lengths = [], []
    outer = _lcp(prompts)
    if outer >= min_shared:
        sizes.append(b)
        lengths.append((outer,))
    else:
        outer = 0
    best, best_saved = None, 0
    for g in range(2, b):
        if b % g:
            continue
        extra = tuple(_lcp(prompts[i : i + g]) - outer for i in range(0, b, g))
        saved = (g - 1) * sum(extra)
        if sum(extra) / len(extra) >= min_shared and saved > best_saved:
            best, best_saved = (g, extra), saved
    if best is not None:
        sizes.append(best[0])
        lengths.append(best[1])
    if not sizes:
        return None
    return Plan(group_rows=tuple(sizes), lengths=tuple(lengths))


def shared_prompt(prompts: Sequence[Sequence[int]], plan: Plan, unique_extra: int, block) -> SharedPrompt:
    """The device arrays of `plan` for `prompts`; `block(n)` pads a block of n tokens (the host
    driver's bucketing), `unique_extra` = own-segment slots past the longest suffix block (the output
    budget and the tree window)."""
    b = len(prompts)
    level_tokens, level_lens = [], []
    start = np.zeros(b, np.int64)
    for g, lens in zip(plan.group_rows, plan.lengths, strict=True):
        toks = np.zeros((b // g, block(max(lens))), np.int32)
        for i, n in enumerate(lens):
            row = i * g
            toks[i, :n] = prompts[row][start[row] : start[row] + n]
        level_tokens.append(jnp.asarray(toks))
        level_lens.append(jnp.asarray(np.array(lens, np.int32)))
        start += np.repeat(np.array(lens), g)
    suffix_lens = np.array([len(p) - s for p, s in zip(prompts, start, strict=True)], np.int32)
    u = block(int(suffix_lens.max()))
    suffix = np.zeros((b, u), np.int32)
    for i, (p, s) in enumerate(zip(prompts, start, strict=True)):
        suffix[i, : len(p) - s] = p[s:]
    return SharedPrompt(tuple(level_tokens), tuple(level_lens), jnp.asarray(suffix), jnp.asarray(suffix_lens),
                        unique_size=u + unique_extra)  # fmt: skip


def prefill_shared(
    params: Params, cfg: ModelConfig, shared: SharedPrompt, prompt_block: int, *, taps: tuple[int, ...] = ()
) -> tuple[Float[Array, "B 1 V"], tuple[Float[Array, "B T D"], ...], KVCache]:
    """Prefill each shared level once per group, then each row's suffix after its prefix.

    Returns (logits at each row's last prompt token, the hidden `taps` of every prompt position
    [B, prompt_block, D] (assembled from the levels' and the suffixes'), the cache: the levels as
    `shared`, the suffixes in the rows' own segments, `lengths` = the prefix tokens (the caller
    sets the prompt lengths, as after `llama.prefill`))."""
    segments: tuple[SharedSegment, ...] = ()
    level_taps = []
    for toks, lens in zip(shared.level_tokens, shared.level_lens, strict=True):
        cache = KVCache.init(cfg, toks.shape[0], toks.shape[1]).replace(shared=segments)
        _, out, cache = prefill(params, cfg, toks, cache.replace(lengths=cache.base), taps=taps)
        segments += (SharedSegment(k=cache.k, v=cache.v, lengths=lens),)
        level_taps.append(out)
    b = shared.suffix.shape[0]
    cache = KVCache.init(cfg, b, shared.unique_size).replace(shared=segments)
    cache = cache.replace(lengths=cache.base)
    logits, out, cache = prefill(params, cfg, shared.suffix, cache, taps=taps,
                                 last=(shared.suffix_lens - 1)[:, None])  # fmt: skip
    full = tuple(
        _assemble([lt[i] for lt in level_taps], out[i], segments, cache.base, prompt_block)
        for i in range(len(taps))
    )
    return logits, full, cache


def _assemble(levels, suffix, segments, base, t: int) -> Float[Array, "B T D"]:
    """Per-row hidden states of prompt positions [0, t) from the levels' [G, P, D] and the suffix's
    [B, U, D] (positions past a row's prompt hold whatever their source does: never read)."""
    b = suffix.shape[0]
    pos = jnp.arange(t)[None, :]
    start = jnp.zeros((b,), jnp.int32)
    out = jnp.zeros((b, t, suffix.shape[-1]), suffix.dtype)
    for x, seg in zip(levels, segments, strict=True):
        n = seg.per_row(seg.lengths, b)
        rel = pos - start[:, None]
        vals = jnp.take_along_axis(seg.per_row(x, b), jnp.clip(rel, 0, x.shape[1] - 1)[..., None], axis=1)
        out = jnp.where(((rel >= 0) & (rel < n[:, None]))[..., None], vals, out)
        start = start + n
    rel = pos - base[:, None]
    vals = jnp.take_along_axis(suffix, jnp.clip(rel, 0, suffix.shape[1] - 1)[..., None], axis=1)
    return jnp.where((rel >= 0)[..., None], vals, out)


def sharing_shape(prompts: Sequence[Sequence[int]], mode: str, block) -> tuple:
    """What of the compiled programs' shapes sharing decides for `prompts` (`mode` "auto" / "off";
    `block` the driver's bucketing): per level (groups, padded length), then the padded suffix."""
    plan = plan_sharing(prompts) if mode == "auto" else None
    if plan is None:
        return ()
    levels = zip(plan.group_rows, plan.lengths, strict=True)
    levels = tuple((len(prompts) // g, block(max(lens))) for g, lens in levels)
    return levels + (block(max(len(p) - plan.base(r) for r, p in enumerate(prompts))),)


def expand_samples(prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """Each prompt repeated `n` times, consecutively (sample j of prompt i is row i n + j)."""
    if n < 1:
        raise ValueError(f"num_samples must be >= 1, got {n}")
    return [list(p) for p in prompts for _ in range(n)]


__all__ = [
    "MIN_SHARED", "Plan", "SharedPrompt", "expand_samples", "plan_sharing", "prefill_shared", "shared_prompt",
    "sharing_shape",
]  # fmt: skip

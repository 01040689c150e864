"""Spec-Bench metrics (`evaluation/speed.py`) on per-turn records, plus the lossless check.

Definitions (one method vs the shared baseline, per run r, per group G = a category or all):

    speed(q)       = Σ_turns new_tokens / Σ_turns wall_time         one question, one run
    tok/s(G, r)    = mean_{q in G} speed(q)                          a mean of per-question speeds
    speedup(G, r)  = tok/s_method(G, r) / tok/s_baseline(G, r)       a ratio of means, not a mean of ratios
    speedup(G)     = mean ± std (ddof=1) of speedup(G, r) over runs  Spec-Bench get_mean_speedup
    τ(G)           = Σ step_tokens / Σ steps, pooled over turns and runs
    decode speedup = speedup with decode-only speeds, Σ step_tokens / Σ (wall_time − prefill_time):
                     what speculation changes, apart from the prefill (which dominates long prompts)

`steps` are the target forwards of the decode loop while the row ran (prefill excluded) and
`step_tokens` the tokens those forwards emitted, accepted drafts plus the bonus token, i.e.
new_tokens − 1 (the prefill emits the first token). AR decoding has τ = 1 exactly. This equals
`GenerateOutput.tau` for a batch of one.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence

Key = tuple[int, int | str, int]  # (run, question_id, turn)


@dataclasses.dataclass(frozen=True)
class TurnRecord:
    """One decoded turn of one question by one configuration in one run.

    Invariants: new_tokens == len(tokens); step_tokens <= new_tokens; wall_time > 0 for timed turns.
    With batch_size > 1, wall_time is the wall time of the whole batched call (the latency this row
    saw), shared by the rows of that call.
    """

    run: int
    question_id: int | str
    category: str
    turn: int  # 0-based
    new_tokens: int  # generated tokens, EOS included (Spec-Bench's `new_token`)
    wall_time: float  # seconds, prefill + decode loop, tokenization excluded
    steps: int  # target forwards of the decode loop while this row ran (prefill excluded)
    step_tokens: int  # tokens emitted by those forwards, bonus included (= new_tokens - 1)
    tokens: tuple[int, ...] = ()  # the generated ids (for the lossless check)
    batch_size: int = 1
    call: int = 0  # id of the generate call (rows of one batched call share it and its wall time)
    # The call's drafter calls, verification widths and loop steps, on its first row only (0 on the
    # others): drafter calls per step and verified tokens per row per step, pooled.
    draft_calls: int = 0
    verify_width: int = 0
    loop_steps: int = 0
    prefill_time: float = 0.0  # seconds of wall_time spent in the prefill (target and drafter)

    @property
    def key(self) -> Key:
        return (self.run, self.question_id, self.turn)


@dataclasses.dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof=1; None with fewer than two values)."""

    mean: float
    std: float | None
    n: int

    def fmt(self, digits: int = 2, suffix: str = "") -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}{suffix}"
        return f"{self.mean:.{digits}f}{suffix} ± {self.std:.{digits}f}"


def mean_std(values: Iterable[float]) -> MeanStd:
    vals = [float(v) for v in values]
    if not vals:
        return MeanStd(float("nan"), None, 0)
    return MeanStd(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))


def question_speeds(
    records: Iterable[TurnRecord], decode: bool = False
) -> dict[tuple[int, int | str], float]:
    """(run, question_id) -> Σ new tokens / Σ wall time over that question's turns; `decode`: the
    decode loop's speed, Σ step tokens / Σ (wall time − prefill time)."""
    tok: dict[tuple[int, int | str], int] = {}
    sec: dict[tuple[int, int | str], float] = {}
    for r in records:
        k = (r.run, r.question_id)
        tok[k] = tok.get(k, 0) + (r.step_tokens if decode else r.new_tokens)
        sec[k] = sec.get(k, 0.0) + r.wall_time - (r.prefill_time if decode else 0.0)
    return {k: tok[k] / sec[k] if sec[k] > 0 else float("nan") for k in tok}


def tokens_per_s_by_run(records: Iterable[TurnRecord], decode: bool = False) -> dict[int, float]:
    """run -> mean over questions of the per-question speed (`decode`: decode-loop speed)."""
    per_run: dict[int, list[float]] = {}
    for (run, _), speed in question_speeds(records, decode).items():
        per_run.setdefault(run, []).append(speed)
    return {run: statistics.fmean(v) for run, v in sorted(per_run.items())}


def tau(records: Iterable[TurnRecord]) -> float:
    """Tokens per target forward, bonus included (pooled): Σ step_tokens / Σ steps."""
    recs = list(records)
    steps = sum(r.steps for r in recs)
    return sum(r.step_tokens for r in recs) / steps if steps else float("nan")


def throughput(records: Iterable[TurnRecord]) -> float:
    """Σ tokens / Σ wall time of the calls (each batched call's time counted once)."""
    tok, calls = 0, {}
    for r in records:
        tok += r.new_tokens
        calls[(r.run, r.call)] = r.wall_time
    seconds = sum(calls.values())
    return tok / seconds if seconds > 0 else float("nan")


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """First index where two token sequences differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def mismatches(method: Iterable[TurnRecord], baseline: Iterable[TurnRecord]) -> list[dict]:
    """Turns whose tokens differ from the baseline's: [{run, question_id, turn, first_diff}]."""
    base = {r.key: r for r in baseline}
    out = []
    for r in method:
        b = base.get(r.key)
        if b is None:
            continue
        pos = first_difference(r.tokens, b.tokens)
        if pos is not None:
            out.append({"run": r.run, "question_id": r.question_id, "turn": r.turn, "first_diff": pos})
    return out


def _group(method: list[TurnRecord], baseline: list[TurnRecord], check: bool) -> dict:
    m_runs, b_runs = tokens_per_s_by_run(method), tokens_per_s_by_run(baseline)
    runs = [r for r in m_runs if r in b_runs]
    m, b = mean_std(m_runs[r] for r in runs), mean_std(b_runs[r] for r in runs)
    s = mean_std(m_runs[r] / b_runs[r] for r in runs)
    m_dec, b_dec = tokens_per_s_by_run(method, decode=True), tokens_per_s_by_run(baseline, decode=True)
    dec = mean_std(m_dec[r] / b_dec[r] for r in runs)
    wall = sum(r.wall_time for r in method)
    out = {
        "n_questions": len({r.question_id for r in method}),
        "speedup": s.mean,
        "speedup_std": s.std,
        "tau": tau(method),
        "baseline_tau": tau(baseline),
        "method_tokens_per_s": m.mean,
        "method_tokens_per_s_std": m.std,
        "baseline_tokens_per_s": b.mean,
        "baseline_tokens_per_s_std": b.std,
        "new_tokens": sum(r.new_tokens for r in method),
        "decode_speedup": dec.mean,
        "decode_speedup_std": dec.std,
        "prefill_share": sum(r.prefill_time for r in method) / wall if wall > 0 else float("nan"),
    }
    if check:
        out["lossless_mismatches"] = len(mismatches(method, baseline))
    return out


def summarize(
    method: Sequence[TurnRecord], baseline: Sequence[TurnRecord], *, lossless_check: bool = True
) -> dict:
    """Overall and per-category metrics of one method against the baseline.

    Returns {"overall": group, "per_category": {category: group}} where a group holds n_questions,
    speedup (+ _std), tau, baseline_tau, method/baseline_tokens_per_s (+ _std), new_tokens,
    decode_speedup (+ _std), prefill_share (of the method's wall time) and,
    when `lossless_check`, lossless_mismatches. Categories keep their order of first appearance.
    """
    cats = list(dict.fromkeys(r.category for r in baseline))
    per_cat = {
        c: _group(
            [r for r in method if r.category == c], [r for r in baseline if r.category == c], lossless_check
        )
        for c in cats
    }
    return {"overall": _group(list(method), list(baseline), lossless_check), "per_category": per_cat}


def mean_accepted(hist: Sequence[int]) -> float:
    """Mean tokens per step of an accepted-length histogram (index k = k tokens emitted)."""
    n = sum(hist)
    return sum(k * c for k, c in enumerate(hist)) / n if n else float("nan")


def acceptance_per_depth(hist: Sequence[int]) -> list[float]:
    """a(d) for d = 1 .. len(hist) - 2: the fraction of steps whose accepted path reaches depth d.

    `hist[k]` counts steps that emitted k tokens (k − 1 accepted drafts + the bonus), so
    a(d) = Σ_{k > d} hist[k] / Σ hist; τ = 1 + Σ_d a(d). The conditional acceptance at depth d
    (given depth d − 1 was reached) is a(d) / a(d − 1), with a(0) = 1.
    """
    n = sum(hist)
    if not n:
        return []
    return [sum(hist[d + 1 :]) / n for d in range(1, len(hist) - 1)]


def finite_or_none(x: float | None) -> float | None:
    """JSON-safe: NaN/inf become None."""
    return None if x is None or not math.isfinite(x) else x


def step_costs(recs: Sequence[TurnRecord]) -> tuple[float, float]:
    """(drafter calls per loop step, verified tokens per row per loop step), pooled over calls."""
    steps = sum(r.loop_steps for r in recs)
    if not steps:
        return float("nan"), float("nan")
    return sum(r.draft_calls for r in recs) / steps, sum(r.verify_width for r in recs) / steps

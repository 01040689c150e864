"""Outputs of an evaluation run, all in one folder (`write_all`):

* `model_answer/<model_id>.jsonl`: FastChat answers of run 1 for the method(s) and the baseline,
  judge-ready; each choice also carries Spec-Bench's per-turn new_tokens, wall_time and decoding_steps.
* `model_answer/run<r>/<model_id>.jsonl`: runs 2.. (a sub-folder, so FastChat's judge ignores them).
* `metrics.json`: the numbers (see `build_metrics`).
* `report.md`: tables per method and per category, machine and load.
* `speedup_per_category.png`, `tau_per_category.png`, `accepted_lengths.png`.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import platform
import statistics
import sys

from specdec.eval.metrics import (
    acceptance_per_depth,
    finite_or_none,
    mean_accepted,
    mismatches,
    step_costs,
    summarize,
    throughput,
)
from specdec.eval.mtbench import BASELINE, EvalResult
from specdec.eval.quality import quality

TOP_LEVEL = (
    "speedup",
    "speedup_std",
    "decode_speedup",
    "prefill_share",
    "tau",
    "method_tokens_per_s",
    "method_tokens_per_s_std",
    "baseline_tokens_per_s",
    "baseline_tokens_per_s_std",
    "baseline_tau",
    "per_category",
    "lossless_mismatches",
)
PLOTS = ("speedup_per_category.png", "tau_per_category.png", "accepted_lengths.png")


def _clean(obj):
    """NaN/inf -> None recursively (metrics.json stays strict JSON)."""
    if isinstance(obj, float):
        return finite_or_none(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _quality(res: EvalResult, lab: str) -> dict | None:
    """Exact match and F1 against short references (`specdec.eval.quality`); not for MT-Bench."""
    if res.config.bench == "mt_bench":
        return None
    return quality(res.answers[lab], res.questions)


def build_metrics(res: EvalResult) -> dict:
    """metrics.json: the primary (first) method's numbers at top level, every method under `methods`.

    Top level: speedup (+_std), tau, method_tokens_per_s, baseline_tokens_per_s, baseline_tau,
    per_category {category: {speedup, tau, method/baseline_tokens_per_s, n_questions, ...}},
    lossless_mismatches (None when not checked: temperature > 0), compile_seconds {label: s},
    config, machine. `methods[label]` repeats that for each method plus mismatch details, the
    accepted-length histogram and throughput (Σ tokens / Σ call time; differs with batch_size > 1).
    """
    import jax

    check = res.config.temperature == 0.0
    base = res.records[BASELINE]
    methods = {}
    for lab in res.labels[1:]:
        s = summarize(res.records[lab], base, lossless_check=check)
        mm = mismatches(res.records[lab], base) if check else []
        methods[lab] = {
            "model_id": res.model_ids[lab],
            "verifier_lossless": res.methods[lab].lossless,
            **s["overall"],
            "per_category": s["per_category"],
            "lossless_mismatches": len(mm) if check else None,
            "mismatch_details": mm[:50],
            "throughput_tokens_per_s": throughput(res.records[lab]),
            "accepted_hist": res.hists[lab],
            "mean_accepted": mean_accepted(res.hists[lab]),
            "acceptance_per_depth": acceptance_per_depth(res.hists[lab]),
            **dict(
                zip(
                    ("draft_calls_per_step", "verify_width_per_step"),
                    step_costs(res.records[lab]),
                    strict=True,
                )
            ),
            "compile_seconds": res.compile_seconds[lab],
            "warmup_seconds": res.warmup_seconds[lab],
            "timed_compiles": res.timed_compiles[lab],
            "quality": _quality(res, lab),
        }
    primary = methods[res.labels[1]]
    samples = [s[1] for s in res.load["samples"]]
    out = {
        "bench": res.config.bench,
        "primary_method": res.labels[1],
        **{k: primary[k] for k in TOP_LEVEL},
        "lossless_checked": check,
        "compile_seconds": dict(res.compile_seconds),
        "methods": methods,
        "baseline": {
            "model_id": res.model_ids[BASELINE],
            "throughput_tokens_per_s": throughput(base),
            "compile_seconds": res.compile_seconds[BASELINE],
            "warmup_seconds": res.warmup_seconds[BASELINE],
            "timed_compiles": res.timed_compiles[BASELINE],
            "quality": _quality(res, BASELINE),
        },
        "n_questions": len(res.questions),
        "n_turns": sum(len(q.turns) for q in res.questions),
        "question_ids": [q.question_id for q in res.questions],
        "config": res.config.as_dict(),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "cpu_count": res.load["cpu_count"],
            "cpu_affinity": res.load["affinity"],
            "loadavg_start": res.load["start"],
            "loadavg_end": res.load.get("end"),
            "loadavg_1min_mean": statistics.fmean(samples) if samples else None,
            "loadavg_1min_max": max(samples) if samples else None,
            "loadavg_samples": res.load["samples"],  # [seconds since start, 1 min, 5 min, 15 min]
        },
        "target_source": res.target_source,
        "wall_seconds": res.wall_seconds,
        "resumed_batches": res.resumed_batches,  # question batches restored from progress.jsonl
        "cache_clears": res.cache_clears,  # compiled programs dropped near vm.max_map_count
        "tstamp": res.tstamp,
    }
    return _clean(out)


def _answer_id(model_id: str, run: int, question_id) -> str:
    """Deterministic 22-character answer id (FastChat uses a random shortuuid of that length)."""
    return hashlib.sha1(f"{model_id}/{run}/{question_id}".encode()).hexdigest()[:22]


def write_answers(res: EvalResult, out: pathlib.Path) -> list[pathlib.Path]:
    """FastChat model_answer JSONL per configuration (run 1 at the top, later runs in run<r>/)."""
    paths = []
    for lab in res.labels:
        recs = {(r.run, r.question_id, r.turn): r for r in res.records[lab]}
        for run, answers in sorted(res.answers[lab].items()):
            folder = out / "model_answer" / ("" if run == 0 else f"run{run + 1}")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{res.model_ids[lab]}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for q in res.questions:
                    turns = answers.get(q.question_id, [])
                    tr = [recs[(run, q.question_id, t)] for t in range(len(turns))]
                    aid = _answer_id(res.model_ids[lab], run, q.question_id)
                    rec = {
                        "question_id": q.question_id, "answer_id": aid, "model_id": res.model_ids[lab],
                        "category": q.category,
                        "choices": [{
                            "index": 0, "turns": turns, "new_tokens": [r.new_tokens for r in tr],
                            "wall_time": [round(r.wall_time, 5) for r in tr],
                            "decoding_steps": [r.steps for r in tr],
                        }],
                        "tstamp": res.tstamp,
                    }  # fmt: skip
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            paths.append(path)
    return paths


def _pm(x, sd, digits=2, suffix=""):
    if x is None:
        return "–"
    return f"{x:.{digits}f}{suffix}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def _md(label: str) -> str:
    """A label as a Markdown table cell (pipes escaped)."""
    return "`" + label.replace("|", "\\|") + "`"


def tables(m: dict) -> str:
    """Markdown: one row per method (overall), then one row per category (speedup and τ per method)."""
    labels = list(m["methods"])
    lines = [
        "| method | tok/s | baseline tok/s | speedup | decode-only speedup | prefill share | τ "
        "| drafter calls / step | verified width / step | mismatching turns | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lab, r in m["methods"].items():
        mism = "n/a (T>0)" if r["lossless_mismatches"] is None else str(r["lossless_mismatches"])
        if r["verifier_lossless"] is False:
            mism += " (lossy verifier)"
        lines.append(
            f"| {_md(lab)} | {_pm(r['method_tokens_per_s'], r['method_tokens_per_s_std'], 1)} | "
            f"{_pm(r['baseline_tokens_per_s'], r['baseline_tokens_per_s_std'], 1)} | "
            f"{_pm(r['speedup'], r['speedup_std'], 2, '×')} | "
            f"{_pm(r.get('decode_speedup'), r.get('decode_speedup_std'), 2, '×')} | "
            f"{_pm(r.get('prefill_share'), None)} | {_pm(r['tau'], None)} | "
            f"{_pm(r.get('draft_calls_per_step'), None)} | {_pm(r.get('verify_width_per_step'), None)} | "
            f"{mism} | "
            f"{r['compile_seconds']:.1f} |"
        )
    short = ["" if len(labels) == 1 else f"m{i + 1} " for i in range(len(labels))]
    head = (
        "| category | n | baseline tok/s | "
        + " | ".join(f"{s}tok/s | {s}speedup | {s}τ" for s in short)
        + " |"
    )
    lines += ["", head, "|---|---|---|" + "---|---|---|" * len(labels)]
    cats = list(m["methods"][labels[0]]["per_category"])
    for cat in [*cats, "overall"]:
        rows = [r if cat == "overall" else r["per_category"][cat] for r in m["methods"].values()]
        cells = [
            f"{cat if cat != 'overall' else '**overall**'}",
            str(rows[0]["n_questions"]),
            _pm(rows[0]["baseline_tokens_per_s"], None, 1),
        ]
        for r in rows:
            cells += [
                _pm(r["method_tokens_per_s"], None, 1),
                _pm(r["speedup"], r["speedup_std"], 2, "×"),
                _pm(r["tau"], None),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if m["baseline"].get("quality"):
        lines += ["", "| method | exact match | F1 | answers |", "|---|---|---|---|"]
        for lab, r in [("baseline (AR)", m["baseline"]), *m["methods"].items()]:
            qa = r["quality"]
            lines.append(f"| {_md(lab)} | {qa['exact_match']:.2f} | {qa['f1']:.2f} | {qa['n']} |")
    lines += ["", *depth_table(m)]
    if len(labels) > 1:
        lines += ["", "; ".join(f"m{i + 1} = {_md(lab)}" for i, lab in enumerate(labels))]
    return "\n".join(lines)


def depth_table(m: dict) -> list[str]:
    """Markdown rows: per method, a(d) = P(accepted path reaches depth d), d = 1 .. deepest."""
    rows = {lab: r.get("acceptance_per_depth") or acceptance_per_depth(r["accepted_hist"])
            for lab, r in m["methods"].items()}  # fmt: skip
    depth = max((len(a) for a in rows.values()), default=0)
    if not depth:
        return []
    out = [
        "| method | " + " | ".join(f"a({d})" for d in range(1, depth + 1)) + " |",
        "|---|" + "---|" * depth,
    ]
    for lab, a in rows.items():
        cells = [f"{x:.3f}" for x in a] + [""] * (depth - len(a))
        out.append(f"| {_md(lab)} | " + " | ".join(cells) + " |")
    return out


def write_report_md(m: dict, out: pathlib.Path) -> pathlib.Path:
    """report.md: settings, the tables of `tables`, definitions, compile time, machine and load."""
    c, mach, base = m["config"], m["machine"], m["baseline"]
    timed = sum(r["timed_compiles"] for r in m["methods"].values()) + base["timed_compiles"]
    prompts = "plain text" if c["raw"] else "chat template"
    settings = (
        f"Target `{c['target']}` ({m['target_source']}); {m['n_questions']} questions, {m['n_turns']} "
        f"turns; temperature {c['temperature']} (top_k {c['top_k']}, top_p {c['top_p']}); max_new_tokens "
        f"{c['max_new_tokens']}; batch size {c['batch_size']}; {c['runs']} run(s) (± = std over runs); seed "
        f"{c['seed']}; prompts: {prompts}. Baseline: the same decode loop with no drafter "
        f"(`{base['model_id']}`)."
    )
    machine = (
        f"Machine: {mach['platform']}, {mach['device']}, {mach['cpu_count']} CPUs ({mach['cpu_affinity']} "
        f"usable), JAX {mach['jax']}. Load average (1/5/15 min) at start {mach['loadavg_start']}, at end "
        f"{mach['loadavg_end']}; 1-min load sampled after each question: mean "
        f"{_pm(mach['loadavg_1min_mean'], None)}, max {_pm(mach['loadavg_1min_max'], None)}. "
        f"Total wall time {m['wall_seconds']:.0f} s"
        + (
            f" ({m['resumed_batches']} question batches restored from progress.jsonl)."
            if m.get("resumed_batches")
            else "."
        )
    )
    text = "\n\n".join([
        f"# {c['bench']} evaluation: speculative decoding vs autoregressive",
        settings,
        tables(m),
        "Speedup = mean(method per-question tok/s) / mean(baseline per-question tok/s), per-question "
        "tok/s = Σ new tokens / Σ wall time over its turns (Spec-Bench `speed.py`); τ = tokens per "
        "target forward, bonus token included (AR = 1); a(d) = fraction of decode steps whose "
        "accepted path reaches depth d (τ = 1 + Σ a(d)). Mismatching turns: at temperature 0, turns "
        "whose tokens differ from the baseline's (0 for a lossless verifier; the first differing "
        "positions are in metrics.json).",
        f"Compile seconds are excluded from all timings (baseline: {base['compile_seconds']:.1f} s); "
        f"compiles during timed calls: {timed} (expected 0).",
        machine,
        "![speedup](speedup_per_category.png) ![tau](tau_per_category.png) "
        "![accepted lengths](accepted_lengths.png)",
    ])  # fmt: skip
    path = out / "report.md"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def write_plots(m: dict, out: pathlib.Path) -> list[pathlib.Path]:
    """Grouped bars of speedup and τ per category (one bar per method), and accepted-length histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(m["methods"])
    cats = [*m["methods"][labels[0]]["per_category"], "overall"]
    x = np.arange(len(cats))
    width = 0.8 / len(labels)
    paths = []
    for key, name, ref in (("speedup", PLOTS[0], 1.0), ("tau", PLOTS[1], 1.0)):
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cats)), 4))
        for i, lab in enumerate(labels):
            r = m["methods"][lab]
            rows = [r if c == "overall" else r["per_category"][c] for c in cats]
            vals = [row[key] if row[key] is not None else np.nan for row in rows]
            err = [row.get(f"{key}_std") or 0.0 for row in rows] if key == "speedup" else []
            err = err if any(err) else None  # no error bars without several runs
            ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, yerr=err, label=lab, capsize=2)
        ax.axhline(ref, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, cats, rotation=30, ha="right")
        ax.set_ylabel("speedup vs AR (×)" if key == "speedup" else "τ (tokens per target forward)")
        what = "speedup" if key == "speedup" else "τ"
        ax.set_title(f"{pathlib.Path(m['bench']).name}: {what} per category")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    fig, ax = plt.subplots(figsize=(6, 4))
    longest = max(len(m["methods"][lab]["accepted_hist"]) for lab in labels)
    ks = np.arange(1, max(longest, 2))
    for i, lab in enumerate(labels):
        h = np.zeros(longest)
        hist = m["methods"][lab]["accepted_hist"]
        h[: len(hist)] = hist
        frac = h[1:] / max(h.sum(), 1)
        ax.bar(ks + (i - (len(labels) - 1) / 2) * width, frac[: len(ks)], width, label=lab)
    ax.set_xticks(ks)
    ax.set_xlabel("tokens emitted per target forward (accepted drafts + bonus)")
    ax.set_ylabel("fraction of steps")
    ax.set_title("accepted lengths")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=110)
    plt.close(fig)
    paths.append(out / PLOTS[2])
    return paths


def write_all(res: EvalResult, out: str | pathlib.Path) -> dict:
    """Write answers, metrics.json, plots and report.md into `out`; return the metrics dict."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_answers(res, out)
    m = build_metrics(res)
    (out / "metrics.json").write_text(json.dumps(m, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_plots(m, out)
    write_report_md(m, out)
    return m

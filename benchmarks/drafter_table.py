"""One comparison table of drafters from the runs that measured them (no new measurement).

Joins, per `drafter|tree`: τ and acceptance per depth a(d) from `specdec-eval` runs at T = 0
(`metrics.json`: MT-Bench; one run per drafter family, each with its own AR baseline, so a killed
run loses at most one family), its mismatching turns (0 for a lossless
verifier), τ at T = 1 from `specdec-eval` runs at T = 1 when given, and from
`benchmarks/spec_vs_ar.py` (batch 1, same machine; one run per family, each against its own AR
baseline) the draft cost per step in ms (building the tree plus the drafter's own update after
the commit, e.g. Amphista's adaptation layers or a draft KV cache), that cost as a fraction of
the same run's T = 1 target step, the whole speculative step, and the batch-1 wall-clock speedup
with the τ behind it (that benchmark's own prompts and 128 new tokens, not MT-Bench: τ differs
from the T = 0 column).

    python benchmarks/drafter_table.py --eval runs/retrain/eval/t0/eagle,runs/retrain/eval/t0/medusa \\
        --eval_t1 runs/retrain/eval/t1/eagle --cost runs/retrain/eval/cost/eagle.json \\
        --out runs/retrain/eval/table.md
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "eval", None, "specdec-eval output folders at T = 0 (each holds metrics.json).", required=True
)
flags.DEFINE_list("eval_t1", [], "specdec-eval output folders at T = 1 (optional).")
flags.DEFINE_list("cost", [], "benchmarks/spec_vs_ar.py JSONs of the same configurations (optional).")
flags.DEFINE_integer("depths", 3, "Acceptance-per-depth columns a(1)..a(D).")
flags.DEFINE_string("out", None, "Write the markdown table here (printed either way).")


def _methods(folders: list[str]) -> dict[str, dict]:
    """`drafter|tree` → the method's metrics (the verifier part of the label dropped), over runs.

    Folders without metrics.json (a run not finished yet) are skipped with a note, so the table
    can be drawn while later families are still being evaluated."""
    out = {}
    for folder in folders:
        f = pathlib.Path(folder) / "metrics.json"
        if not f.exists():
            print(f"drafter_table: {folder} has no metrics.json yet (run unfinished): left out")
            continue
        for label, v in json.loads(f.read_text())["methods"].items():
            out["|".join(label.split("|")[:2])] = v
    return out


def _fmt(x, spec: str, missing: str = "–") -> str:
    return missing if x is None else format(x, spec)


def _cost(files: list[str]) -> tuple[dict[str, dict], list[float]]:
    """`drafter|tree` → its spec_vs_ar.py run, with `ar_step_ms` (that run's AR loop step) added."""
    runs, ar_steps = {}, []
    for f in files:
        r = json.loads(pathlib.Path(f).read_text())["runs"]
        ar = r["AR"]["step_ms"]["loop_step"]
        ar_steps.append(ar)
        runs.update({k: {**v, "ar_step_ms": ar} for k, v in r.items() if k != "AR"})
    return runs, ar_steps


def table(t0: dict[str, dict], t1: dict[str, dict], cost: list[str], depths: int) -> str:
    runs, ar_steps = _cost(cost)
    head = ["drafter", "tree", "τ T=0", *(f"a({d})" for d in range(1, depths + 1)), "mismatching turns",
            "τ T=1", "draft ms", "draft / T=1 step", "step ms", "τ batch 1", "speedup (batch 1)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, m in t0.items():
        drafter, tree = key.split("|")
        apd = (m.get("acceptance_per_depth") or []) + [None] * depths
        c = runs.get(key, {})
        ms = c.get("step_ms", {})
        # the drafter's whole cost per step: the tree and its own update after the commit
        draft = None if "draft" not in ms else ms["draft"] + ms.get("drafter_update", 0.0)
        row = [f"`{drafter}`", f"`{tree}`", _fmt(m["tau"], ".2f")]
        row += [_fmt(a, ".3f") for a in apd[:depths]]
        row += [f"{m['lossless_mismatches']}", _fmt(t1.get(key, {}).get("tau"), ".2f"), _fmt(draft, ".1f"),
                _fmt(None if draft is None else draft / c["ar_step_ms"], ".2f"),
                _fmt(ms.get("loop_step"), ".1f"), _fmt(c.get("tau"), ".2f"),
                _fmt(c.get("speedup"), ".2f")]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    if ar_steps:
        lines.append("\nT = 1 target step (AR loop step, batch 1; one per cost run): "
                     + ", ".join(f"{a:.1f}" for a in ar_steps) + " ms.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    text = table(_methods(FLAGS.eval), _methods(FLAGS.eval_t1), FLAGS.cost, FLAGS.depths)
    print(text)
    if FLAGS.out:
        pathlib.Path(FLAGS.out).write_text(text)


if __name__ == "__main__":
    app.run(main)

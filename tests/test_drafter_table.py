"""benchmarks/drafter_table.py joins per-family evaluation runs into one table (no JAX)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP = "runs/retrain/drafters"  # where recipes/retrain_smollm2.sh keeps the drafters it trains


def _run(folder: Path, methods: dict) -> str:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"methods": methods}))
    return str(folder)


def _method(tau, apd, mismatches=0):
    return {"tau": tau, "acceptance_per_depth": apd, "lossless_mismatches": mismatches}


def test_table_joins_runs_and_skips_unfinished(tmp_path):
    a = _run(tmp_path / "t0/eagle", {f"{KEEP}/eagle|chain:6|auto": _method(2.5, [0.6, 0.4, 0.3]),
                                      "eagle|chain:6|auto": _method(1.5, [0.3, 0.1])})  # fmt: skip
    b = _run(tmp_path / "t0/medusa", {f"{KEEP}/medusa|chain:4|auto": _method(1.8, [0.5, 0.2, 0.1], 1)})
    t1 = _run(tmp_path / "t1/eagle", {f"{KEEP}/eagle|chain:6|auto": _method(2.1, [0.5])})
    # one cost run per family, each with its own AR baseline: a row's ratio uses its own run's
    cost, cost_m = tmp_path / "cost_eagle.json", tmp_path / "cost_medusa.json"
    step = {"step_ms": {"draft": 8.0, "drafter_update": 2.0, "loop_step": 60.0}, "tau": 2.2, "speedup": 1.6}
    runs = {"AR": {"step_ms": {"loop_step": 40.0}}, f"{KEEP}/eagle|chain:6": step}
    cost.write_text(json.dumps({"runs": runs}))
    step_m = {"step_ms": {"draft": 5.0, "loop_step": 55.0}, "tau": 1.4, "speedup": 1.1}
    cost_m.write_text(json.dumps({"runs": {"AR": {"step_ms": {"loop_step": 50.0}},
                                           f"{KEEP}/medusa|chain:4": step_m}}))  # fmt: skip
    out = tmp_path / "table.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/drafter_table.py"),
                        f"--eval={a},{b},{tmp_path / 't0/falcon'}", f"--eval_t1={t1}",
                        f"--cost={cost},{cost_m}", f"--out={out}"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert "t0/falcon has no metrics.json yet" in r.stdout
    lines = out.read_text().splitlines()
    eagle = next(line for line in lines if line.startswith(f"| `{KEEP}/eagle`"))
    # τ T=0, a(1..3), mismatches, τ T=1, draft ms, draft / T=1 step, step ms, τ batch 1, speedup
    assert [c.strip() for c in eagle.split("|")[3:-1]] == \
        ["2.50", "0.600", "0.400", "0.300", "0", "2.10", "10.0", "0.25", "60.0", "2.20", "1.60"]  # fmt: skip
    medusa = next(line for line in lines if line.startswith(f"| `{KEEP}/medusa`"))
    assert [c.strip() for c in medusa.split("|")[3:-1]] == \
        ["1.80", "0.500", "0.200", "0.100", "1", "–", "5.0", "0.10", "55.0", "1.40", "1.10"]  # fmt: skip
    shipped = next(line for line in lines if line.startswith("| `eagle`"))
    assert "| 0.300 | 0.100 | – |" in shipped  # a(3) missing
    assert "T = 1 target step (AR loop step, batch 1; one per cost run): 40.0, 50.0 ms." in out.read_text()

#!/usr/bin/env bash
# Training objectives at an equal budget (docs/training.md, "Objectives"): EAGLE-1 on the whole
# self-distilled set with cross-entropy (today's), total variation, the LK hybrid, and HASS context
# alignment (3 steps, CE), the same seed, data order and schedule. Compared by the held-out
# acceptances the trainer measures (top-1 = a greedy chain's a(1) at T = 0; α = Σ min(p, q) at
# T = 1), then on MT-Bench (all 80) chains at T = 0 and T = 1.
#
#   recipes/objectives_smollm2.sh train     # the arms (resumable: rerun after a kill)
#   recipes/objectives_smollm2.sh report    # held-out table and curves -> $RECORD/heldout.md, .png
#   recipes/objectives_smollm2.sh eval      # MT-Bench chain:6, T = 0 and T = 1, all arms in one run each
#   recipes/objectives_smollm2.sh record    # the evaluations' summaries (reports, metrics, plots) -> $RECORD
#
# Uses the retrain recipe's feature cache ($FEATURES; `recipes/retrain_smollm2.sh features` builds
# it). Everything a run writes lives in $RUNS (runs/ is ignored by git): training runs, the trained
# drafters ($KEEP/<arm>) and the evaluation runs ($EVAL_OUT); `report` and `record` write summaries
# to $RECORD (docs/results/objectives). ARMS / STEPS / RUNS / EVAL_OUT / KEEP / RECORD override the
# defaults; pin with taskset.
set -euo pipefail
RUNS=${RUNS:-runs/obj}
SET=${SET:-data/selfdistill/smollm2-135m-instruct}
FEATURES=${FEATURES:-runs/retrain/features}
KEEP=${KEEP:-$RUNS/drafters}  # the trained drafters (8 MB each)
EVAL_OUT=${EVAL_OUT:-$RUNS/eval}  # the evaluation runs (answers, journals, reports)
RECORD=${RECORD:-docs/results/objectives}  # the summaries kept in git
ARMS=${ARMS:-ce lk tv hass}
STEPS=${STEPS:-600}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/xla_cache}

arm() {
  case $1 in
    ce | tv | lk) echo "--loss $1" ;;
    hass) echo "--loss ce --align_steps 3" ;;
    *) echo "unknown arm $1 (ce tv lk hass)" >&2; exit 2 ;;
  esac
}

case ${1:-train} in
  train)
    for a in $ARMS; do
      if [ -f "$KEEP/$a/drafter.json" ]; then echo "$KEEP/$a: trained"; continue; fi
      # shellcheck disable=SC2046
      specdec-train --drafter eagle --regenerated "$SET" --features "$FEATURES" --extract_dtype auto \
        --max_len 512 --lr 1e-3 --warmup 30 --eval_every 200 --steps "$STEPS" $(arm "$a") --out "$RUNS/$a"
      mkdir -p "$KEEP" && cp -r "$RUNS/$a/drafter" "$KEEP/$a"
    done
    ;;
  report)
    mkdir -p "$RECORD"
    python - "$KEEP" "$RECORD/heldout.md" $ARMS <<'EOF'
import json, pathlib, sys
keep, out, arms = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]
rows = ["| arm | steps | held-out loss | top-1 (T = 0) | α (T = 1) | τ est. T = 0 | τ est. T = 1 |",
        "|---|---|---|---|---|---|---|"]
for a in arms:
    f = keep / a / "drafter.json"
    if not f.exists():
        continue
    t = json.loads(f.read_text())["training"]
    h = t["heldout"]
    rows.append(f"| {a} | {t['steps']} | {h['loss']:.3f} | {h['acc0']:.3f} | {h.get('alpha0', float('nan')):.3f} "
                f"| {h['tau_est']:.3f} | {h.get('tau_est_t1', float('nan')):.3f} |")
out.write_text("\n".join(rows) + "\n")
print(out.read_text())
EOF
    python - "$RUNS" "$RECORD/heldout.png" $ARMS <<'EOF'
# Training curves: top-1 and α (T = 1) per step (training batches, smoothed; held-out points marked).
import json, pathlib, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
runs, out, arms = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for a in arms:
    f = runs / a / "history.json"
    if not f.exists():
        continue
    h = json.loads(f.read_text())
    tr = [r for r in h if "acc0" in r and "alpha0" in r]
    ho = [r for r in h if "heldout" in r]
    for ax, key in zip(axes, ("acc0", "alpha0")):
        x, y = np.array([r["step"] for r in tr]), np.array([r[key] for r in tr])
        k = min(10, len(y))
        line, = ax.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, "valid"), label=a, alpha=0.8)
        ax.plot([r["step"] for r in ho], [r["heldout"].get(key, np.nan) for r in ho], "o",
                color=line.get_color())
for ax, t in zip(axes, ("top-1 (a greedy chain's a(1), T = 0)", "α = Σ min(p, q) (T = 1)")):
    ax.set_xlabel("step"); ax.set_title(t); ax.grid(alpha=0.3)
axes[0].legend(title="objective (dots: held-out)")
fig.suptitle("EAGLE-1 on the self-distilled set: training objectives at an equal budget")
fig.tight_layout(); fig.savefig(out, dpi=110)
print(out)
EOF
    ;;
  eval)
    for temp in 0 1; do
      args=()
      for a in $ARMS; do args+=(--compare "$KEEP/$a|chain:6|auto"); done
      specdec-eval --all --batch_size 8 --temperature $temp --warmup_runs 0 "${args[@]}" --out "$EVAL_OUT/t$temp"
    done
    ;;
  record)
    # report.md, metrics.json and plots per temperature; answer files and journals stay in $EVAL_OUT
    dst=$(realpath -m "$RECORD")
    mkdir -p "$dst"
    (cd "$EVAL_OUT" && find . -type f \( -name '*.md' -o -name '*.json' -o -name '*.png' \) -exec cp --parents {} "$dst" \;)
    echo "recorded the summaries of $EVAL_OUT in $RECORD"
    ;;
  *) echo "usage: $0 train|report|eval|record" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Every drafter family retrained on the whole self-distilled set (docs/training.md, "Retraining on
# the self-distilled set"), then MT-Bench (all 80, T=0) τ per drafter and tree.
#
#   recipes/retrain_smollm2.sh features        # the set's feature cache (a worker per core, resumable)
#   recipes/retrain_smollm2.sh dflash-layers   # DFlash depth 3/4/5 by held-out τ (300 steps each)
#   recipes/retrain_smollm2.sh train eagle     # one drafter (resumable from its checkpoints)
#   recipes/retrain_smollm2.sh eval [D...]     # τ at T = 0, one run per family (resumes its journal)
#   recipes/retrain_smollm2.sh eval-t1 [D...]  # τ at T = 1 (lossless verifier), chains, one run each
#   recipes/retrain_smollm2.sh cost [D...]     # draft cost per step (ms, vs a T=1 step), batch 1
#   recipes/retrain_smollm2.sh table           # the comparison table from the three runs above
#   recipes/retrain_smollm2.sh record          # their summaries (reports, metrics, plots) -> $RECORD
#   recipes/retrain_smollm2.sh ship            # retrained drafters become the shipped ones where better
#   recipes/retrain_smollm2.sh all             # all of the above but ship, in order; rerun after a kill
#
# Everything a run writes lives in $RUNS (runs/ is ignored by git): the feature cache, the training
# runs, the trained drafters ($KEEP/<drafter>) and the evaluation runs ($EVAL_OUT: answer files and
# resumable journals). A new machine rebuilds the cache, ~1.2 h for 2.5M tokens on two Zen 4 cores
# (bf16 products), ~2 h on two Zen 3 cores (f32), less what REUSE holds. The set itself is in git
# (data/selfdistill/); `record` copies the evaluations' summaries to $RECORD (docs/results/retrain)
# and `ship` copies a drafter into the package (specdec/data/drafters/). STEPS overrides a
# drafter's step count; pin a job with taskset to run two drafters side by side.
set -euo pipefail
RUNS=${RUNS:-runs/retrain}
SET=${SET:-data/selfdistill/smollm2-135m-instruct}
KEEP=${KEEP:-$RUNS/drafters}   # the trained drafters, one folder per family
EVAL_OUT=${EVAL_OUT:-$RUNS/eval}  # the evaluation runs (answers, journals, reports)
RECORD=${RECORD:-docs/results/retrain}  # the summaries kept in git
# The drafters shipped now: each family's reference row, unless the retrained one is identical.
SHIPPED=${SHIPPED:-specdec/data/drafters}
FEATURES=$RUNS/features
FAMILIES="eagle eagle3 medusa amphista falcon dflash"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/xla_cache}
# bf16 products in extraction where the CPU has bf16 instructions (Zen 4: 1.6x faster, labels = the
# f32 argmax at ~99% of positions); f32 on AVX2-only CPUs, where bf16 is 1.35x slower.
DTYPE=${DTYPE:-auto}
# Conversations regenerated on this machine already have features (--regenerate writes them): copied.
REUSE=${REUSE-$( (ls -d runs/train/features-*-regen 2>/dev/null || true) | paste -sd, -)}
COMMON="--regenerated $SET --features $FEATURES --extract_dtype $DTYPE --max_len 512 --lr 1e-3 --warmup 30 --eval_every 500"

# Copies the summaries of an evaluation tree (*.md, *.json, *.png) to a folder kept in git; the
# answer files (model_answer/*.jsonl) and resumable journals (progress.jsonl) stay where they are.
record() {
  local src=$1 dst
  dst=$(realpath -m "$2")
  [ -d "$src" ] || { echo "$src: nothing to record yet" >&2; return 1; }
  mkdir -p "$dst"
  (cd "$src" && find . -type f \( -name '*.md' -o -name '*.json' -o -name '*.png' \) -exec cp --parents {} "$dst" \;)
  echo "recorded the summaries of $src in $2"
}

# DFlash's depth for SmolLM2 (3-5 layers at the target's width) by measurement: `dflash-layers`
# trains each for 300 steps; the fewest layers whose held-out τ estimate is within 2% of the best.
# Draft layers start as copies of the target's last layers (`--dflash_init target`): at 3 layers and
# 300 steps, held-out loss 5.08 vs 5.91 and τ estimate 1.21 vs 1.16 for random layers
# (docs/results/retrain/dflash_init.json).
DFLASH_INIT=${DFLASH_INIT:-target}
dflash_layers() {
  if [ -n "${DFLASH_LAYERS:-}" ]; then echo "$DFLASH_LAYERS"; return; fi
  # this machine's `dflash-layers` run, else the recorded one
  local f=$EVAL_OUT/dflash_layers.json
  [ -f "$f" ] || f=$RECORD/dflash_layers.json
  [ -f "$f" ] || { echo 3; return; }
  python -c 'import json, sys; t = json.load(open(sys.argv[1])); best = max(t.values())
print(min(int(k) for k, v in t.items() if v >= 0.98 * best))' "$f"
}

recipe() {
  case $1 in
    eagle) echo "--steps ${STEPS:-2000}" ;;
    eagle-hass) echo "--steps ${STEPS:-2000} --align_steps 3" ;;  # a variant: not in $FAMILIES yet
    # a variant: EAGLE's held-out top-1 still rose at 2,000 steps (0.45 -> 0.48 over the last 500)
    eagle-long) echo "--steps ${STEPS:-6000}" ;;
    # a variant: the shipped EAGLE-1 (or $EAGLE_INIT) fine-tuned further (warm start, a fresh schedule
    # at half the peak rate; $LOSS picks the objective, recipes/objectives_smollm2.sh compares them)
    eagle-more) echo "--steps ${STEPS:-3000} --lr 5e-4 --init_from ${EAGLE_INIT:-$SHIPPED/eagle}${LOSS:+ --loss $LOSS}" ;;
    eagle3) echo "--steps ${STEPS:-600} --ttt_steps 7" ;;
    medusa) echo "--steps ${STEPS:-1000} --heads 4" ;;
    amphista) echo "--steps ${STEPS:-1000} --heads 4" ;;
    amphista-own) echo "--steps ${STEPS:-1000} --heads 4 --own_heads" ;;  # own LM heads: the measured alternative
    falcon) echo "--steps ${STEPS:-2000} --falcon_k 2" ;;
    dflash) echo "--steps ${STEPS:-1000} --block_size 16 --dflash_layers $(dflash_layers) --dflash_init $DFLASH_INIT" ;;
    *) echo "unknown drafter $1 (eagle eagle-hass eagle-long eagle-more eagle3 medusa amphista amphista-own falcon dflash)" >&2; exit 2 ;;
  esac
}
# MT-Bench configurations per drafter: chains for a(d), the published tree shapes for τ.
trees() {
  case $1 in
    eagle | eagle-hass | eagle-long | eagle-more) echo "chain:6 dynamic:depth=6,topk=10,n=60" ;;
    # Falcon on EAGLE-2's 60-node dynamic tree too: their τ compared at equal tree size
    falcon) echo "chain:6 static:falcon dynamic:depth=6,topk=10,n=60" ;;
    eagle3) echo "chain:7 dynamic:depth=6,topk=10,n=60" ;;
    medusa | amphista | amphista-own) echo "chain:4 static:medusa63" ;;
    dflash) echo "chain:15 dynamic:depth=15,topk=10,n=60" ;;
  esac
}

case ${1:-} in
  features)
    # One worker process per core ($WORKERS, pinned): one Zen 3 core alone extracts ~160 tok/s, one
    # process on both cores ~230 tok/s (XLA's threads split a 2,048-token batch's matmuls poorly).
    # Resumable: rerun after a kill.
    n=${WORKERS:-$(nproc)}
    for ((i = 0; i < n; i++)); do
      # shellcheck disable=SC2086
      taskset -c "$((i % $(nproc)))" specdec-train --extract_worker "$i/$n" $COMMON \
        ${REUSE:+--reuse_features "$REUSE"} --out "$RUNS/extract" &
    done
    wait
    python -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["complete"] else 1)' \
      "$FEATURES/manifest.json" || { echo "feature extraction incomplete: rerun $0 features" >&2; exit 1; }
    ;;
  train)
    d=${2:?drafter}
    out=$RUNS/$d
    if [ -f "$KEEP/$d/drafter.json" ]; then echo "$KEEP/$d: trained"; exit 0; fi
    # shellcheck disable=SC2046,SC2086
    specdec-train --drafter "${d%%-*}" $COMMON $(recipe "$d") --out "$out"
    mkdir -p "$KEEP" && cp -r "$out/drafter" "$KEEP/$d"
    ;;
  eval)
    # One run per family ($EVAL_OUT/t0/<d>: its trees, the drafter it would replace, its own AR
    # baseline, ~10 min of ~1 h on one core), so a kill costs at most one family's run.
    shift
    # shellcheck disable=SC2086
    [ $# -gt 0 ] || set -- $FAMILIES
    for d in "$@"; do
      [ -f "$KEEP/$d/drafter.json" ] || { echo "$KEEP/$d is not trained yet: $0 train $d" >&2; exit 2; }
      args=()
      for t in $(trees "$d"); do args+=(--compare "$KEEP/$d|$t|auto"); done
      # the drafter shipped now, on its chain: the reference for `ship` (none if identical)
      if [ -d "$SHIPPED/$d" ] && ! diff -rq "$KEEP/$d" "$SHIPPED/$d" >/dev/null 2>&1; then
        args+=(--compare "$SHIPPED/$d|$(trees "$d" | cut -d' ' -f1)|auto")
      fi
      specdec-eval --all --batch_size 8 --temperature 0 --warmup_runs 0 "${args[@]}" --out "$EVAL_OUT/t0/$d"
    done
    ;;
  eval-t1)
    # T = 1 with the lossless default verifier (auto: recursive rejection sampling on trees), chains.
    shift
    # shellcheck disable=SC2086
    [ $# -gt 0 ] || set -- $FAMILIES
    for d in "$@"; do
      t=$(trees "$d")
      specdec-eval --all --batch_size 8 --temperature 1 --warmup_runs 0 --compare "$KEEP/$d|${t%% *}|auto" \
        --out "$EVAL_OUT/t1/$d"
    done
    ;;
  cost)
    # One run per family ($EVAL_OUT/cost/<d>.json: its trees and its own AR baseline, ~8 min on
    # two quiet cores), so ratios come from one run and a kill loses at most one family.
    shift
    # shellcheck disable=SC2086
    [ $# -gt 0 ] || set -- $FAMILIES
    mkdir -p "$EVAL_OUT/cost"
    for d in "$@"; do
      [ -f "$EVAL_OUT/cost/$d.json" ] && { echo "$EVAL_OUT/cost/$d.json: measured"; continue; }
      [ -f "$KEEP/$d/drafter.json" ] || { echo "$KEEP/$d is not trained yet: $0 train $d" >&2; exit 2; }
      args=()
      for t in $(trees "$d"); do args+=(--config "$KEEP/$d|$t"); done
      python benchmarks/spec_vs_ar.py --max_new_tokens 128 "${args[@]}" --out "$EVAL_OUT/cost/$d.json"
    done
    ;;
  table)  # τ, a(d), draft cost and batch-1 speedup in one markdown table (docs/drafters.md)
    cost=()
    files=$( (ls "$EVAL_OUT"/cost/*.json 2>/dev/null || true) | paste -sd,)  # none yet: no cost columns
    [ -z "$files" ] || cost=(--cost "$files")
    python benchmarks/drafter_table.py --eval "$(ls -d "$EVAL_OUT"/t0/* | paste -sd,)" \
      --eval_t1 "$( (ls -d "$EVAL_OUT"/t1/* 2>/dev/null || true) | paste -sd,)" \
      "${cost[@]}" --out "$EVAL_OUT/table.md"
    ;;
  dflash-layers)
    for l in 3 4 5; do
      out=$RUNS/dflash-layers-$l-$DFLASH_INIT
      # shellcheck disable=SC2086
      [ -f "$out/drafter/drafter.json" ] || specdec-train --drafter dflash $COMMON --steps 300 --block_size 16 \
        --dflash_layers "$l" --dflash_init "$DFLASH_INIT" --out "$out"
    done
    mkdir -p "$EVAL_OUT"
    python - "$RUNS" "$EVAL_OUT/dflash_layers.json" "$DFLASH_INIT" <<'PY'
import json, sys
t = {l: json.load(open(f"{sys.argv[1]}/dflash-layers-{l}-{sys.argv[3]}/drafter/drafter.json"))["training"]["heldout"]["tau_est"]
     for l in (3, 4, 5)}
print("DFlash held-out tau estimate after 300 steps, by layers:", {k: round(v, 3) for k, v in t.items()})
json.dump(t, open(sys.argv[2], "w"), indent=1)
PY
    ;;
  record)
    # The evaluations' summaries (report.md, metrics.json, plots, cost JSON, the table) into $RECORD;
    # answer files and journals stay in $EVAL_OUT.
    record "$EVAL_OUT" "$RECORD"
    ;;
  ship)
    # Retrained drafters replace the shipped ones (specdec/data/drafters/) where their chain τ (T = 0,
    # against `eval`'s reference row) is higher; a family not shipped yet ships as it is. Each must
    # stay <= 40 MB.
    for d in $FAMILIES; do
      [ -f "$KEEP/$d/drafter.json" ] && [ -f "$EVAL_OUT/t0/$d/metrics.json" ] || continue  # not trained/evaluated yet
      if diff -rq "$KEEP/$d" "specdec/data/drafters/$d" >/dev/null 2>&1; then echo "$d: already shipped"; continue; fi
      mb=$(du -sm "$KEEP/$d" | cut -f1)
      [ "$mb" -le 40 ] || { echo "$KEEP/$d is $mb MB (> 40): not shipped" >&2; continue; }
      python - "$EVAL_OUT/t0/$d/metrics.json" "$KEEP/$d" "$SHIPPED/$d" "$(trees "$d" | cut -d' ' -f1)" <<'PY' || continue
import json, sys
m = json.load(open(sys.argv[1]))["methods"]
new, old = m[f"{sys.argv[2]}|{sys.argv[4]}|auto"]["tau"], m.get(f"{sys.argv[3]}|{sys.argv[4]}|auto", {}).get("tau", 0)
print(f"{sys.argv[3]} {sys.argv[4]}: tau {new:.2f} retrained vs {old:.2f} shipped")
sys.exit(0 if new > old else 1)
PY
      rm -rf "specdec/data/drafters/$d" && cp -r "$KEEP/$d" "specdec/data/drafters/$d"
      echo "shipped specdec/data/drafters/$d"
    done
    ;;
  all)
    "$0" features
    "$0" dflash-layers
    for d in $FAMILIES; do "$0" train "$d"; done
    for d in $FAMILIES; do "$0" eval "$d"; done
    "$0" eval-t1
    "$0" cost
    "$0" table
    "$0" record
    ;;
  *) echo "usage: $0 features | dflash-layers | train DRAFTER | eval [DRAFTER...] | eval-t1 | cost | table | record | ship | all" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Original vs regenerated answers at an equal budget, per drafter (docs/training.md, "Original vs
# regenerated answers"). The same first N ShareGPT prompts of the seeded shuffle, the same recipe
# per drafter; then MT-Bench (all 80, T=0) chains for τ and acceptance per depth.
#
#   recipes/ablation_smollm2.sh train     # features + 6 drafters (resumable: rerun after a kill)
#   recipes/ablation_smollm2.sh eval      # specdec-eval per drafter, both arms (resumes its journal)
#   recipes/ablation_smollm2.sh record    # the evaluations' summaries (reports, metrics, plots) -> $RECORD
#
# The regenerated arm reads the committed set (data/selfdistill/...), so only features are rebuilt
# on a new machine. Everything a run writes lives in $RUNS (runs/ is ignored by git): features,
# training runs, the trained drafters ($KEEP/<arm>-<drafter>) and the evaluation runs ($EVAL_OUT,
# hours on one core at batch 8; a killed one resumes its journal). `record` copies their summaries
# to $RECORD (docs/results/ablation). ARMS / DRAFTERS / N / RUNS / EVAL_OUT / KEEP / RECORD / DTYPE
# override the defaults; pin with taskset.
set -euo pipefail
RUNS=${RUNS:-runs/abl}
SET=${SET:-data/selfdistill/smollm2-135m-instruct}
N=${N:-1500}
KEEP=${KEEP:-$RUNS/drafters}  # the trained drafters (8 MB for an EAGLE-1)
EVAL_OUT=${EVAL_OUT:-$RUNS/eval}  # the evaluation runs (answers, journals, reports)
RECORD=${RECORD:-docs/results/ablation}  # the summaries kept in git
ARMS=${ARMS:-orig regen}
DRAFTERS=${DRAFTERS:-medusa eagle eagle3}
# The target's matmuls in feature extraction, the same for both arms: float32 (EAGLE-1's arms ran
# so; bf16 is 1.35x slower on the AVX2-only machines, and Medusa's/EAGLE-3's earlier bf16 original
# arms were dropped before evaluation to keep all three ablations in one precision).
DTYPE=${DTYPE:-float32}
# The regenerated arm's sequences are the set's first N: copied from the retrain recipe's cache when
# it exists (same target, taps and precision), not extracted again.
REUSE=${REUSE-$(ls -d runs/retrain/features 2>/dev/null || true)}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/xla_cache}

recipe() {
  case $1 in
    medusa) echo "--steps 300 --heads 4" ;;
    eagle) echo "--steps 600" ;;
    eagle3) echo "--steps 300 --ttt_steps 3" ;;
  esac
}
chain() { case $1 in medusa) echo chain:4 ;; *) echo chain:6 ;; esac; }
data() {
  if [ "$1" = orig ]; then
    echo "--num_conversations $N --features $RUNS/features-orig-$N-$DTYPE --extract_dtype $DTYPE"
  else
    echo "--regenerated $SET --max_sequences $N --features $RUNS/features-regen-$N-$DTYPE --extract_dtype $DTYPE" \
      "${REUSE:+--reuse_features $REUSE}"
  fi
}

case ${1:-train} in
  train)
    for arm in $ARMS; do
      for d in $DRAFTERS; do
        out=$RUNS/$arm-$d
        if [ -f "$KEEP/$arm-$d/drafter.json" ]; then echo "$KEEP/$arm-$d: trained"; continue; fi
        # shellcheck disable=SC2046
        specdec-train --drafter "$d" $(data "$arm") --max_len 512 --lr 1e-3 --warmup 30 \
          $(recipe "$d") --out "$out"
        mkdir -p "$KEEP" && cp -r "$out/drafter" "$KEEP/$arm-$d"
      done
    done
    ;;
  eval)
    # One run per drafter, both arms against one AR baseline.
    for d in $DRAFTERS; do
      args=()
      for arm in $ARMS; do args+=(--compare "$KEEP/$arm-$d|$(chain "$d")|auto"); done
      [ "$d" = eagle ] && args+=(--compare "eagle|chain:6|auto")  # the shipped EAGLE-1, a reference
      # τ and a(d) only, no timing: no warm-up generations (wall-clock comes from the main evaluation)
      specdec-eval --all --batch_size 8 --temperature 0 --warmup_runs 0 "${args[@]}" --out "$EVAL_OUT/$d"
    done
    ;;
  record)
    # report.md, metrics.json and plots per drafter; answer files and journals stay in $EVAL_OUT
    dst=$(realpath -m "$RECORD")
    mkdir -p "$dst"
    (cd "$EVAL_OUT" && find . -type f \( -name '*.md' -o -name '*.json' -o -name '*.png' \) -exec cp --parents {} "$dst" \;)
    echo "recorded the summaries of $EVAL_OUT in $RECORD"
    ;;
  *) echo "usage: $0 train|eval|record" >&2; exit 2 ;;
esac

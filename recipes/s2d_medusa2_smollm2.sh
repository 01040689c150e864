#!/usr/bin/env bash
# S2D (a sorted multi-exit drafter over the target's first layers) and Medusa-2 (heads trained with
# the target's last layers: a new target) for the embedded target, from the self-distilled set:
# what ships as `--drafter s2d`, `--target smollm2-135m-instruct-medusa2 --drafter medusa2`.
#
#   recipes/s2d_medusa2_smollm2.sh s2d        # S2D: features (taps 4, 8, 12, 30), SoFT, thresholds
#   recipes/s2d_medusa2_smollm2.sh medusa2    # Medusa-2: features (taps 26, 30), joint training
#   recipes/s2d_medusa2_smollm2.sh s2d-medusa2  # S2D's thresholds for the Medusa-2 target
#   recipes/s2d_medusa2_smollm2.sh ship       # copy both into specdec/data (drafters, targets)
#   recipes/s2d_medusa2_smollm2.sh drift      # Medusa-2's quality drift from the original
#   recipes/s2d_medusa2_smollm2.sh eval       # MT-Bench all 80, T = 0: both targets
#
# Every step resumes (rerun after a kill). runs/ is ignored by git; RUNS overrides it.
set -euo pipefail
RUNS=${RUNS:-runs/train}
SET=${SET:-data/selfdistill/smollm2-135m-instruct}
EVAL=${EVAL:-runs/eval}
export HF_HUB_OFFLINE=1

case ${1:-} in
  s2d)
    specdec-train --drafter s2d --exits 4,8,12 --conf_weight 1.0 --positions 128 --regenerated "$SET" \
      --max_sequences 1500 --extract_dtype auto --out "$RUNS/s2d" --steps 2500 --batch_size 4 --lr 1e-3 \
      --warmup 50 --heldout 64 --eval_every 500 --save_every 50
    # thresholds chosen for a depth-2 chain on the 64 held-out sequences (the cache's last ones)
    python -m specdec.train.s2d_thresholds --drafter "$RUNS/s2d/drafter" --depth 2 --write \
      --features "$RUNS/features-$(basename "$SET")-1500-taps4_8_12_30"
    ;;
  medusa2)
    # stage 1 = the shipped Medusa-1 heads (--init_from medusa); stage 2 trains the last 4 layers
    specdec-train --drafter medusa2 --init_from medusa --backbone_layers 4 --heads_weight 0.2 --heads_lr 4 \
      --positions 128 --regenerated "$SET" --max_sequences 640 --extract_dtype auto --out "$RUNS/medusa2" \
      --steps 500 --batch_size 4 --lr 1e-4 --warmup 20 --heldout 32 --eval_every 100 --save_every 20
    ;;
  s2d-medusa2)
    # the Medusa-2 target's own labels on the same held-out sequences, then its thresholds
    specdec-train --drafter s2d --exits 4,8,12 --target "$RUNS/medusa2/target" --regenerated "$SET" \
      --skip_sequences 1436 --max_sequences 64 --extract_dtype auto --extract_only \
      --features "$RUNS/features-medusa2-heldout64-taps4_8_12_30" --out "$RUNS/s2d-medusa2"
    python -m specdec.train.s2d_thresholds --drafter specdec/data/drafters/s2d --depth 2 --write \
      --target smollm2-135m-instruct-medusa2 --features "$RUNS/features-medusa2-heldout64-taps4_8_12_30"
    ;;
  ship)
    rm -rf specdec/data/drafters/s2d specdec/data/drafters/medusa2 specdec/data/targets/smollm2-135m-instruct-medusa2
    cp -r "$RUNS/s2d/drafter" specdec/data/drafters/s2d
    mkdir -p specdec/data/targets
    cp -r "$RUNS/medusa2/target" specdec/data/targets/smollm2-135m-instruct-medusa2
    cp -r "$RUNS/medusa2/drafter" specdec/data/drafters/medusa2
    # the heads draft for the shipped target: name it by its registry name
    python - <<'EOF'
import json, pathlib
f = pathlib.Path("specdec/data/drafters/medusa2/drafter.json")
meta = json.loads(f.read_text())
meta["target"]["source"] = "smollm2-135m-instruct-medusa2"
f.write_text(json.dumps(meta, indent=1))
EOF
    ;;
  drift)
    python benchmarks/backbone_drift.py --tuned smollm2-135m-instruct-medusa2 \
      --out docs/results/medusa2_drift_xeon_2026-12-07.json
    ;;
  eval)
    # S2D against every fixed layer-skip exit and EAGLE, one shared baseline
    specdec-eval --all --out "$EVAL/s2d_all80" --compare "s2d|chain:2" --compare "layerskip:4|chain:2" \
      --compare "layerskip:8|chain:2" --compare "layerskip:12|chain:2" --compare "eagle|dynamic:depth=2,topk=3,n=4"
    specdec-eval --all --target smollm2-135m-instruct-medusa2 --out "$EVAL/medusa2_all80" \
      --compare "medusa2|chain:4" --compare "s2d|chain:2"
    ;;
  *)
    echo "usage: $0 s2d | medusa2 | s2d-medusa2 | ship | drift | eval" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Ablations of pre-training on the procedural corpus (issue "Prove what pre-training buys").
#
#   bash benchmarks/pretrain_ablations.sh        # after the corpus and feature steps of `make procedural`
#   python -m benchmarks.ablation_table          # the table of what it wrote
#
# Each ablation is the procedural-cpu preset with one change, trained for S steps (default 1,000;
# no identity-core control), then the frozen probes of direction and speed (budgets 8 and 32,
# 3 seeds, 100 test clips, streaming reading) and the motion probe. The baseline also runs the
# fine-tuned variants (pretrained-ft, scratch), whose numbers do not depend on the objective.
# About 5 min of training and 1-2 min of eval per ablation on 2 CPU cores.
set -u
cd "$(dirname "$0")/.."
source launchers/_python.sh
S=${S:-1000}
LOGS=${LOGS:-runs/ablation-logs}
mkdir -p "$LOGS"

run() {  # name, overrides...
  local name=$1 start
  shift
  echo "=== $name ($S steps) $(date +%T)"
  start=$(date +%s)
  if ! "$PY" -m pretrain.train --config procedural-cpu --train.steps="$S" --train.ckpt_every="$S" \
      --train.eval_every=250 --train.identity_control=false --run.name="abl-$name" "$@" >"$LOGS/$name.train.log" 2>&1; then
    echo "training failed: $LOGS/$name.train.log"; tail -5 "$LOGS/$name.train.log"; return
  fi
  echo "train $(( $(date +%s) - start )) s"
  start=$(date +%s)
  "$PY" -m eval.efficiency --export "runs/abl-$name/export" --out "runs/abl-eff-$name" \
      --tasks classification,classify_speed --budgets 8,32 --readings streaming \
      --variants "${VARIANTS:-pretrained,random,identity}" --no-mlflow >"$LOGS/$name.eff.log" 2>&1 \
    || { echo "efficiency failed: $LOGS/$name.eff.log"; tail -5 "$LOGS/$name.eff.log"; }
  echo "efficiency $(( $(date +%s) - start )) s"
  "$PY" -m eval.velocity_probe --export "runs/abl-$name/export" --out "runs/abl-vel-$name.json" \
      >"$LOGS/$name.vel.log" 2>&1 || { echo "velocity probe failed: $LOGS/$name.vel.log"; }
}

VARIANTS=pretrained,pretrained-ft,scratch,random,identity run base
run vis0 --objective.visible_fraction=0        # pure forecasting (no visible target patches)
run offset1 --objective.target_offsets=[1]     # next frame only (default 1, 2, 4)
run direct --predictor.residual=false          # predict the target, not its change from the last frame
run memall --objective.memory=all              # predictor reads every source frame, not the last state
run gt --core.kind=gated_transformer           # RVM's core instead of GMMix
run mamba --core.kind=mamba                    # the per-patch scan alone
run wide --core.dim=128                        # twice the core width
S=3000 run steps3k                             # three times the pre-training
echo "=== done $(date +%T)"

#!/usr/bin/env bash
# Does an objective change survive the pre-training seed? (issue "Prove what pre-training buys")
#
#   bash benchmarks/pretrain_seeds.sh             # after the corpus and feature steps of `make procedural`
#   python -m benchmarks.seed_table               # the table of what it wrote
#
# Trains the procedural-cpu preset (1,500 steps, no identity-core control) with pre-training seeds
# 0, 1, 2 (SEEDS) for each objective setting below, then the frozen probe of every export on the five
# temporal tasks (budgets 8 and 32, readout seeds READOUT_SEEDS, 100 test clips, streaming reading).
# The controls (scratch, identity) do not depend on the export's weights: run them once, e.g.
#   python -m eval.efficiency --export runs/procedural-cpu/export --budgets 8,32 --seeds 6 ...
# with the same readout seeds, and the rows line up (same dataset hash, same labelled draws).
# About 3 min of training and 70 s of eval per export on 2 CPU cores.
set -u
cd "$(dirname "$0")/.."
source launchers/_python.sh
SEEDS=${SEEDS:-"0 1 2"}
READOUT_SEEDS=${READOUT_SEEDS:-6}
LOGS=${LOGS:-runs/seed-logs}
mkdir -p "$LOGS"

run() {  # name, overrides... (the export is runs/seed-NAME-sSEED)
  local name=$1 seed start
  shift
  for seed in $SEEDS; do
    local tag="seed-$name-s$seed"
    echo "=== $tag $(date +%T)"
    start=$(date +%s)
    if ! "$PY" -m pretrain.train --config procedural-cpu --train.identity_control=false --run.seed="$seed" \
        --run.name="$tag" "$@" >"$LOGS/$tag.train.log" 2>&1; then
      echo "training failed: $LOGS/$tag.train.log"; tail -5 "$LOGS/$tag.train.log"; continue
    fi
    echo "train $(( $(date +%s) - start )) s"
    start=$(date +%s)
    "$PY" -m eval.efficiency --export "runs/$tag/export" --out "runs/$tag-eff" --variants pretrained \
        --tasks classification,classify_speed,classify_order,point_tracking,box_tracking --budgets 8,32 \
        --readings streaming --seeds "$READOUT_SEEDS" --no-mlflow --workers 2 >"$LOGS/$tag.eff.log" 2>&1 \
      || { echo "efficiency failed: $LOGS/$tag.eff.log"; tail -5 "$LOGS/$tag.eff.log"; }
    echo "efficiency $(( $(date +%s) - start )) s"
  done
}

run plain                                          # the preset as it ships (plain L1)
run change1 --objective.change_weight=1.0          # L1 weighted by each patch's change from the last frame
echo "=== done $(date +%T)"

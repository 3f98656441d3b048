#!/usr/bin/env bash
# The data-efficiency experiment at a scale closer to the paper's, for one GPU node (or a CPU, tiny):
# a procedural corpus at 224 px -> feature shards -> the procedural-gpu preset (a 384-wide, 4-layer
# core, plus its identity-core control) -> eval.efficiency on the export, every temporal task, the
# full budget ladder. docs/pretraining-evidence.md says what the CPU preset showed at 112 px.
#
#   bash benchmarks/procedural_gpu.sh                               # one GPU
#   NPROC=8 bash benchmarks/procedural_gpu.sh                       # 8 GPUs of one node (torchrun)
#   TRAIN_ARGS="--core.kind=gmmix" RUN=procedural-gpu-gmmix bash benchmarks/procedural_gpu.sh
#
# Settings (environment):
#   VIDEOS   training clips (default 5000: 16 x 256 tokens x 384 in bf16 is about 16 GB of features)
#   HELDOUT  held-out clips for the trainer's future-prediction gate (default 300)
#   SIZE     frame side in pixels, for the corpus, the encoder and the eval set (default 224)
#   DIR      corpus and feature directory (default runs/procedural-gpu)
#   RUN      run name; the export is runs/$RUN/export (default procedural-gpu)
#   OUT_DIR  the runs directory (default runs)
#   NPROC    training processes on this node (default 1)
#   TRAIN_ARGS, EVAL_ARGS  extra arguments for pretrain.train and eval.efficiency
# A rerun continues after a failure: the corpus and encode steps leave finished output as it is, and
# the trainer resumes its run from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_python.sh

VIDEOS=${VIDEOS:-5000}
HELDOUT=${HELDOUT:-300}
SIZE=${SIZE:-224}
DIR=${DIR:-runs/procedural-gpu}
RUN=${RUN:-procedural-gpu}
OUT_DIR=${OUT_DIR:-runs}
NPROC=${NPROC:-1}
read -r -a train_args <<<"${TRAIN_ARGS:-}"
read -r -a eval_args <<<"${EVAL_ARGS:-}"

step() { echo "== $(date -u +%H:%M:%S) $*"; }

corpus() {  # corpus OUT COUNT SEED
    step "corpus $1: $2 clips at $SIZE px"
    "$PY" -m data_shards procedural --out "$1" --videos "$2" --seed "$3" --frames 16 --size "$SIZE" --clip-frames 16
}

encode() {  # encode CLIPS FEATURES
    step "encode $1 -> $2"
    "$PY" -m pretrain.encode --config procedural-gpu --encoder.image_size="$SIZE" --shards "$1" --out "$2" --no-progress
}

train=(--config procedural-gpu --run.name="$RUN" --run.out_dir="$OUT_DIR" --encoder.image_size="$SIZE"
       --data.shards="$DIR/features" --data.eval_shards="$DIR/heldout-features" --train.progress=false
       "${train_args[@]}")
efficiency=(--export "$OUT_DIR/$RUN/export" --out "$OUT_DIR/$RUN/efficiency" --size "$SIZE" --readings streaming
            --tasks classification,classify_speed,classify_order,point_tracking,box_tracking "${eval_args[@]}")

# Both configs are checked before anything runs: a typo in TRAIN_ARGS or EVAL_ARGS fails now, by name,
# not after the corpus, the encoding or the pre-training.
step "check the training and eval settings"
"$PY" -m pretrain.train "${train[@]}" --print-config >/dev/null
"$PY" -m eval.efficiency "${efficiency[@]}" --check

corpus "$DIR/clips" "$VIDEOS" 0
corpus "$DIR/heldout-clips" "$HELDOUT" 1
encode "$DIR/clips" "$DIR/features"
encode "$DIR/heldout-clips" "$DIR/heldout-features"

step "train $RUN on $NPROC process(es)"
if [[ "$NPROC" -gt 1 ]]; then
    "$PY" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" -m pretrain.train "${train[@]}"
else
    "$PY" -m pretrain.train "${train[@]}"
fi

step "eval.efficiency on $OUT_DIR/$RUN/export"
"$PY" -m eval.efficiency "${efficiency[@]}"
step "done: $OUT_DIR/$RUN/efficiency/efficiency.md"

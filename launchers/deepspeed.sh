#!/usr/bin/env bash
# Launch pretrain.train with the deepspeed launcher over the hosts of a hostfile.
# Every hyperparameter lives in the config; this script only places processes.
#
#   launchers/deepspeed.sh --config vits14-gmmix [--section.key=value ...]
#
# Environment (defaults in brackets):
#   HOSTFILE [launchers/hostfile.example format; unset = this host only]  "host slots=N" lines
#   NUM_GPUS [auto]        processes per host when no hostfile is given: the GPU count, or 2 on CPU
#                          (on a CPU host use --num_gpus; --include localhost:0,1 fails there)
#   MASTER_ADDR [127.0.0.1 / first host]  address of rank 0, reachable from every host
#   MASTER_PORT [29500]
#   Multi-host runs start remote ranks through passwordless ssh + pdsh and forward the variables
#   listed in ~/.deepspeed_env (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA, PYTHONPATH).
# The launcher appends --local_rank=N to the command; pretrain.train accepts it.
# The run directory (run.out_dir) must be on a filesystem every host shares.
# Python: the project's .venv without activation (PYTHON=/path/to/python overrides; see _python.sh).
# The launcher starts local and remote ranks with its own interpreter's path, so on other hosts the
# venv must sit at the same path (a shared filesystem).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
# The `deepspeed` command's module form, under $PY rather than whatever `deepspeed` PATH finds.
DEEPSPEED=("$PY" -m deepspeed.launcher.runner)
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -n "${HOSTFILE:-}" ]]; then
    MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
    exec "${DEEPSPEED[@]}" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --module pretrain.train "$@"
fi
NUM_GPUS=${NUM_GPUS:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")}
exec "${DEEPSPEED[@]}" --num_gpus "$NUM_GPUS" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT" \
    --module pretrain.train "$@"

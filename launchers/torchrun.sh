#!/usr/bin/env bash
# Launch pretrain.train with torchrun (c10d rendezvous): one node or many.
# Every hyperparameter lives in the config; this script only places processes.
#
#   launchers/torchrun.sh --config vits14-gmmix [--section.key=value ...]
#
# Environment (defaults in brackets):
#   NNODES [1]            nodes taking part; run this script once on every node
#   NPROC_PER_NODE [auto] processes per node: the GPU count, or 2 on a CPU-only host
#   RDZV_ENDPOINT         host:port of any one node, reachable from all (required when NNODES > 1)
#   RDZV_ID [pretrain]    rendezvous id; distinct concurrent jobs need distinct ids
#   MAX_RESTARTS [3]      times the group is restarted after a rank dies; runs resume from `latest`
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG=WARN: set to your cluster's interfaces when NCCL
#     picks the wrong one; GLOO_SOCKET_IFNAME does the same on CPU.
# The run directory (run.out_dir) must be on a filesystem every node shares: ranks write their
# checkpoint shards into the same tag directory.
# Python: the project's .venv without activation (PYTHON=/path/to/python overrides; see _python.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if [[ "$NNODES" -gt 1 && -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "RDZV_ENDPOINT=host:port is required with NNODES=$NNODES" >&2
    exit 2
fi
# torchrun's module form: the ranks then run under the same interpreter ($PY), not PATH's.
exec "$PY" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="${RDZV_ENDPOINT:-127.0.0.1:29500}" \
    --rdzv-id="${RDZV_ID:-pretrain}" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    -m pretrain.train "$@"

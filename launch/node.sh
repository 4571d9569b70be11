#!/usr/bin/env bash
# Train on one GPU node: one process per GPU (nccl), bf16 autocast.
#   launch/node.sh model=small stage=main_8k trainer.name=small-node
# NPROC defaults to the number of visible GPUs. Any Hydra override is passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m trainer.train trainer.device=cuda "$@"

#!/usr/bin/env bash
# Train on this machine's CPU with torchrun (gloo): NPROC processes, plain data parallel.
#   launch/local.sh trainer.steps=20 trainer.name=dp2      (NPROC=2 by default)
# Any Hydra override is passed through. Run from anywhere; the repository root is found from this file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
NPROC="${NPROC:-2}"
# One OpenMP thread per process: the processes already share the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m trainer.train trainer.device=cpu "$@"

#!/usr/bin/env bash
# Train on one GPU node: one process per GPU (nccl), bf16 autocast.
#   launch/node.sh model=small stage=main_8k trainer.name=small-node           plain data parallel
#   launch/node.sh parallel=tp2 model=small stage=main_8k                      TP=2 (+SP), DP = GPUs / 2
#   launch/node.sh parallel=tp2 parallel.ep=8 model=small                      TP=2 attention, EP=8 experts
#   launch/node.sh parallel=cp2 parallel.tp=2 parallel.sequence_parallel=true model=small stage=long_128k
#                                                                              CP=2 x TP=2 for 128K windows
# Layouts are conf/parallel/*.yaml; override any size (parallel.tp=2 parallel.cp=4 ...); the trainer names the
# setting that does not fit the model (e.g. small has 2 KV heads, so tp <= 2). NPROC defaults to the number of
# visible GPUs. Any Hydra override is passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec "$PYTHON" -m trainer.launch --standalone --nproc_per_node="$NPROC" \
  -m trainer.train trainer.device=cuda "$@"

#!/usr/bin/env bash
# Train on this machine's CPU with torchrun (gloo): NPROC processes (2 by default).
#   launch/local.sh trainer.steps=20 trainer.name=dp2                 plain data parallel (parallel=single)
#   launch/local.sh parallel=tp2 trainer.name=tp2                     tensor + sequence parallel over 2 ranks
#   launch/local.sh parallel=cp2 stage.seq_len=512 trainer.name=cp2   context parallel (LASP+ / ring attention)
#   launch/local.sh parallel=ep2 parallel.router_mode=local           expert parallel, Megatron's per-rank capacity
#   NPROC=4 launch/local.sh parallel=tp2 parallel.ep=2                TP=2 x DP=2 attention, EP=2 x EDP=2 experts
# Layouts are conf/parallel/*.yaml (dp, tp2, tp2_nosp, tp4, tp8, cp2, ep2, minimax_text_01); sizes not set are
# 1, DP and EDP follow from the world size. A checkpoint of any layout resumes under any other
# (trainer.resume=<run_dir>/checkpoints/step_N). Any Hydra override is passed through; run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
NPROC="${NPROC:-2}"
# One OpenMP thread per process: the processes already share the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m trainer.launch --standalone --nproc_per_node="$NPROC" \
  -m trainer.train trainer.device=cpu "$@"

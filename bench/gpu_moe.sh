#!/usr/bin/env bash
# Issue 5's GPU measurements (needs 2 GPUs, e.g. nvidia-h200-x2). Results and logs go to $OUT (default bench/results).
#   bench/gpu_moe.sh layer     # bench/moe.py: one GPU at the MiniMax expert shape, then EP=2 (small and MiniMax shapes)
#   bench/gpu_moe.sh trainer   # bench/gpu_trainer.sh on `small`: EP=2 with the global and the local router, DP=2
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader

case "${1:-layer}" in
layer)
  CUDA_VISIBLE_DEVICES=0 "$PYTHON" bench/moe.py --tokens 8192,16384,32768 2>&1 | tee "$OUT/moe_single.log" | tail -12
  for preset in small minimax; do
    tokens=$([ $preset = small ] && echo 16384 || echo 8192)
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 bench/moe.py --ep 2 --preset $preset \
      --tokens $tokens 2>&1 | tee "$OUT/moe_ep2_$preset.log" | tail -6
  done
  ;;
trainer)
  bench/gpu_trainer.sh "ep2_global:2:parallel=ep2 parallel.router_mode=global" \
    "ep2_local:2:parallel=ep2 parallel.router_mode=local" dp:2:parallel=dp
  ;;
esac

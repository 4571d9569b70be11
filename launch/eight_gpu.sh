#!/usr/bin/env bash
# Every parallel dimension at once on one 8-GPU node (issue 7), then a 1M-token window with CP=8.
#   launch/eight_gpu.sh                      # on an 8-GPU node; results in $RESULTS (default outputs/eight_gpu)
# 1. 1 GPU and 2 GPUs (DP=2): the same global batch, reference first-step loss and per-GPU throughput.
# 2. 8 GPUs: TP=2 (SP) x CP=2 x DP=2 for attention, EP=4 x ETP=2 (EDP=1) for experts, 50 steps.
# 3. 8 GPUs: CP=8 on a 1,048,576-token window, a few steps, with activation recompute.
# Then a table of tokens/s, TFLOP/s and MFU per GPU and scaling efficiency (bench/summarize_runs.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
RESULTS="${RESULTS:-outputs/eight_gpu}"
MODEL="${MODEL:-small}"
SEQ="${SEQ:-8192}"
STEPS="${STEPS:-50}"
REF_STEPS="${REF_STEPS:-20}"
LONG_SEQ="${LONG_SEQ:-1048576}"
rm -rf "$RESULTS" && mkdir -p "$RESULTS"

# Global batch of 16 windows; micro-batch of 1 window per rank.
common=(model="$MODEL" stage=main_8k stage.seq_len="$SEQ" trainer.micro_batch_size=1
        "schedule.batch=[{tokens:0,global_batch_tokens:$((16 * SEQ))}]" schedule.lr.warmup_steps=5
        schedule.lr.decay_steps=0 schedule.lr.drop_at_step=null trainer.log_every=5
        logging.wandb.mode=disabled logging.progress_bar=false trainer.checkpoint.every=0
        trainer.checkpoint.keep_last=1)
run() {  # run NAME NPROC overrides...
  local name=$1 nproc=$2; shift 2
  local rc=0
  "$PYTHON" -m trainer.launch --standalone --nproc_per_node="$nproc" -m trainer.train \
    "${common[@]}" trainer.run_dir="$RESULTS/$name" "$@" > "$RESULTS/$name.log" 2>&1 || rc=$?
  grep -E "^step|^error" "$RESULTS/$name.log" || true
  if [ "$rc" != 0 ]; then echo "$name failed (exit $rc), see $RESULTS/$name.log"; exit "$rc"; fi
}

run gpu1 1 trainer.steps="$REF_STEPS"
run gpu2_dp 2 parallel=dp trainer.steps="$REF_STEPS"
run gpu8_all 8 parallel=tp2 parallel.cp=2 parallel.ep=4 parallel.etp=2 trainer.steps="$STEPS"
run gpu8_cp8_1m 8 parallel=cp2 parallel.cp=8 stage.seq_len="$LONG_SEQ" stage.rope_base=10000000.0 \
  trainer.recompute=true "schedule.batch=[{tokens:0,global_batch_tokens:$LONG_SEQ}]" schedule.lr.warmup_steps=1 trainer.steps=3

"$PYTHON" bench/summarize_runs.py gpu1="$RESULTS/gpu1" gpu2_dp="$RESULTS/gpu2_dp:2" \
  gpu8_all="$RESULTS/gpu8_all:8" gpu8_cp8_1m="$RESULTS/gpu8_cp8_1m:8" --skip 3 --json "$RESULTS/summary.json"
# The first-step losses of gpu1, gpu2_dp and gpu8_all must agree (same global batch, same initial weights).

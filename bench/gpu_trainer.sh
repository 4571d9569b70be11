#!/usr/bin/env bash
# Short training runs of `small` through the trainer, one per argument, then a table (bench/summarize_runs.py).
#   bench/gpu_trainer.sh NAME:NPROC[:"OVERRIDE ..."] ...
#   bench/gpu_trainer.sh single:1 dp:2:parallel=dp "ep2:2:parallel=ep2 parallel.router_mode=local"
# Every run: bf16, 4096-token windows, 65,536-token global batch, constant LR after 5 warm-up steps, $STEPS steps
# (default 30), no checkpoints. metrics.jsonl of each run and the summary JSON go to $OUT (default bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
common=(model=small stage.seq_len=4096 trainer.micro_batch_size=4 'schedule.batch=[{tokens:0,global_batch_tokens:65536}]'
        schedule.lr.warmup_steps=5 schedule.lr.decay_steps=0 schedule.lr.drop_at_step=null optim.lr=3e-4
        trainer.steps="${STEPS:-30}" trainer.log_every=10 trainer.checkpoint.every=0 trainer.checkpoint.at_end=false
        logging.wandb.mode=disabled logging.progress_bar=false trainer.device=cuda)
runs=()
for spec in "$@"; do
  IFS=: read -r name nproc overrides <<< "$spec"
  dir=/tmp/runs/$name
  rm -rf "$dir"
  # shellcheck disable=SC2086  # overrides are space-separated on purpose
  timeout 300 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m trainer.train \
    "${common[@]}" $overrides trainer.run_dir="$dir" 2>&1 | grep -E "^(run dir|step|error)" | tail -3
  cp "$dir/metrics.jsonl" "$OUT/metrics_$name.jsonl" && runs+=("$name=$dir:$nproc")
done
"$PYTHON" bench/summarize_runs.py "${runs[@]}" --json "$OUT/trainer_runs.json"

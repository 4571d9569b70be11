#!/usr/bin/env bash
# Issue 5's GPU measurements (needs 2 GPUs, e.g. nvidia-h200-x2). Results and logs go to $OUT (default bench/results).
#   bench/gpu_moe.sh layer     # bench/moe.py: one GPU at the MiniMax expert shape, then EP=2 (small and MiniMax shapes)
#   bench/gpu_moe.sh trainer   # the trainer on `small`: EP=2 with the global and the local router, DP=2 for reference
# With a .whl/ folder (device machines) its wheels are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"; mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
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
  common=(model=small stage.seq_len=4096 trainer.micro_batch_size=4 'schedule.batch=[{tokens:0,global_batch_tokens:65536}]'
          schedule.lr.warmup_steps=5 schedule.lr.decay_steps=0 schedule.lr.drop_at_step=null optim.lr=3e-4
          trainer.steps="${STEPS:-30}" trainer.log_every=10 trainer.checkpoint.every=0 trainer.checkpoint.at_end=false
          logging.wandb.mode=disabled logging.progress_bar=false trainer.device=cuda)
  runs=()
  for run in ep2:global ep2:local dp:global; do
    layout=${run%:*}; mode=${run#*:}; dir=/tmp/runs/${layout}_$mode
    timeout 280 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m trainer.train "${common[@]}" \
      parallel=$layout parallel.router_mode=$mode trainer.run_dir=$dir 2>&1 | tail -5
    cp "$dir/metrics.jsonl" "$OUT/metrics_${layout}_$mode.jsonl" && runs+=("${layout}_$mode=$dir:2")
  done
  "$PYTHON" bench/summarize_runs.py "${runs[@]}" --json "$OUT/trainer_ep2.json"
  "$PYTHON" - "$OUT" <<'PY'
import json, statistics, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("metrics_*.jsonl")):
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    print(f.stem, "drop_rate median", round(statistics.median(r["drop_rate"] for r in rows), 4),
          "first", round(rows[0]["drop_rate"], 4), "last", round(rows[-1]["drop_rate"], 4),
          "load_share_max last", round(rows[-1].get("moe/load_share_max", float("nan")), 4))
PY
  ;;
esac

#!/usr/bin/env bash
# One device call for the MFU work on one H200 (bench/NOTES_e2e.md): the card's two ceilings,
# bench/step_profile.py on proxy_1gpu, `small` through trainer.train (bench/gpu_trainer.sh) and its profile,
# then, while time is left, proxy_1gpu at 5 layers with recompute. RUNS picks some of
# "ceilings proxy small recompute" (default: all).
# The proxy trains at MiniMax-Text-01's peak LR, 2e-4 (its speed at the default 3e-3 was the same). Each
# command has its own timeout; profiles go to $OUT/profile_*.json. Device tool, carrying .whl (from
# ../shared/tools/device-wheels.sh):
#   bash bench/gpu_profile.sh 2>&1 | tee $OUT/log.txt
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
runs=" ${RUNS:-ceilings proxy small recompute} "
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
[[ $runs == *" ceilings "* ]] && timeout 60 "$PYTHON" - <<'EOF'
import torch
from triton.testing import do_bench
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
src = torch.randn(2**30, device="cuda")
dst = torch.empty_like(src)
copy_ms = do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
print(f"ceilings: bf16 8192^3 matmul {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s, "
      f"copy {2 * src.numel() * 4 / copy_ms / 1e9:.2f} TB/s (read + write)")
EOF

batch='schedule.batch=[{tokens:0,global_batch_tokens:65536}]'
proxy=(model=proxy_1gpu stage=main_8k trainer.micro_batch_size=1 "$batch" optim.lr=2e-4 trainer.device=cuda)
small=(model=small stage.seq_len=4096 trainer.micro_batch_size=4 "$batch" optim.lr=3e-4 trainer.device=cuda)
profile() {  # NAME TIMEOUT OVERRIDES...
  local name=$1 limit=$2
  shift 2
  echo "== step_profile $name: $*"
  timeout "$limit" "$PYTHON" bench/step_profile.py --warmup 2 --timed 3 --steps 2 \
    --json "$OUT/profile_$name.json" "$@"
  echo "== $name exit code $?"
}
[[ $runs == *" proxy "* ]] && profile proxy_1gpu 270 "${proxy[@]}"
if [[ $runs == *" small "* ]]; then
  echo "== small through trainer.train (bench/gpu_trainer.sh), $SECONDS s so far"
  STEPS=30 timeout 150 bash bench/gpu_trainer.sh single:1
  profile small 90 "${small[@]}"
fi
if [[ $runs == *" recompute "* ]] && [ "$SECONDS" -lt 380 ]; then
  profile proxy_1gpu_5l_recompute 170 "${proxy[@]}" model.num_layers=5 model.softmax_period=5 \
    trainer.recompute=true
fi
echo "== done in $SECONDS s"

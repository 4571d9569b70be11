"""Training: Hydra entry point, loop, schedules, checkpoints, metrics and logging (docs/architecture.md, 'Training')."""

import os

# Runs before torch is imported by `python -m trainer.train`: OpenMP threads that spin while waiting make
# CPU training crawl when the cores are shared with other processes; let idle threads sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

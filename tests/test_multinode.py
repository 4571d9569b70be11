"""Multi-node launch on one machine: `launch/slurm.sbatch` itself, with stub `srun` (one task per node here) and
`scontrol`, starts two torchrun agents that meet through c10d rendezvous (2 ranks each, DP=4) and train like
one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer import MICRO

from trainer.train import main_from_overrides

REPO = Path(__file__).resolve().parent.parent
SRUN = """#!/usr/bin/env bash
while [[ $# -gt 0 && $1 == --* ]]; do shift; done  # srun's own options
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
[[ $1 == show ]] && echo 127.0.0.1
exit 0
"""
RUN = [*MICRO, "trainer.micro_batch_size=1", "trainer.steps=3", "schedule.batch=[{tokens:0,global_batch_tokens:256}]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_agents_started_by_the_sbatch_script_train_like_one_process(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "x",
           "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(REPO), "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "RDZV_PORT": str(_free_port()), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "trainer.device=cpu", "parallel=dp",
                             *RUN, f"trainer.run_dir={tmp_path / 'nodes'}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device cpu x4" in result.stderr, result.stderr[-2000:]  # 2 agents x 2 ranks met
    assert main_from_overrides([*RUN, f"trainer.run_dir={tmp_path / 'single'}"]) == 0
    assert _losses(tmp_path / "nodes") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)

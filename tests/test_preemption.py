"""Stop signals: SIGTERM (one process) and SIGUSR1 (to both ranks of a torchrun job, as SLURM's advance warning
reaches every task) finish the step, write a checkpoint, print one line and exit with EXIT_PREEMPTED (also
through `trainer.launch`, the launch scripts' torchrun); the run then resumes from that checkpoint. A bad layout
under `launch/local.sh` is one line and exit code 2."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trainer import BATCH, MICRO, checkpoint_steps, metrics

from trainer.train import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(cmd: list[str], run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(cmd + [*MICRO, *BATCH, f"trainer.run_dir={run_dir}", "trainer.steps=1000",
                                   "trainer.checkpoint.every=0", "trainer.device=cpu", *overrides],
                            cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int = 2, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the run did not reach step {steps}: {proc.communicate()[1][-2000:]}")


def _check_stopped(proc: subprocess.Popen, run_dir: Path, signame: str) -> int:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {signame} after step "), err[-2000:]
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert checkpoint_steps(run_dir) == [f"step_{step:06d}"]
    assert len(metrics(run_dir)) == step
    return step


def test_sigterm_checkpoints_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start([sys.executable, "-m", "trainer.train"], run_dir)
    _wait_for_steps(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    step = _check_stopped(proc, run_dir, "SIGTERM")
    resumed = subprocess.run([sys.executable, "-m", "trainer.train", *MICRO, *BATCH, f"trainer.run_dir={run_dir}",
                              f"trainer.steps={step + 1}", "trainer.resume=auto", "trainer.device=cpu"],
                             check=False, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["step"] for m in metrics(run_dir)][-1] == step + 1


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep to find torchrun's workers")
def test_sigusr1_to_every_rank_stops_a_torchrun_job_at_one_step(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start([sys.executable, "-m", "trainer.launch", "--standalone", "--nproc_per_node=2",
                   "-m", "trainer.train"], run_dir, "parallel=dp", "trainer.micro_batch_size=1")
    _wait_for_steps(run_dir, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], check=False, capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[0]), signal.SIGUSR1)  # one rank first: the other learns it at the same step
    time.sleep(0.5)
    os.kill(int(workers[1]), signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]  # trainer.launch passes the trainer's code on
    lines = [line for line in err.splitlines() if line.startswith("stopped by SIGUSR1 after step ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert checkpoint_steps(run_dir) == [f"step_{step:06d}"]


def test_launch_script_reports_bad_input_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([str(REPO / "launch" / "local.sh"), "parallel=ep2", "model.num_experts=3",
                             f"trainer.run_dir={run_dir}"], check=False, capture_output=True, text=True, timeout=300,
                            env={**ENV, "PYTHON": sys.executable})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: parallel.ep=2 does not divide model.num_experts=3 (parallel=ep2, world size 2)"], result.stderr
    assert not run_dir.exists()

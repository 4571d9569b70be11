"""The step watchdog: a rank that never reaches the next collective makes the others exit with EXIT_HUNG within
the timeout, with one line naming it (two gloo processes; rank 1 stops after step 2, rank 0 waits in a
barrier after step 3)."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from trainer.watchdog import EXIT_HUNG

REPO = Path(__file__).resolve().parent.parent
WORKER = """
import os, sys, time
import torch.distributed as dist
from trainer.watchdog import StepWatchdog
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
watchdog = StepWatchdog(2.0, rank, 2).start()
for step in range(1, 4 if rank == 0 else 3):
    watchdog.beat(step)
if rank == 1:
    time.sleep(60)  # hangs: never reaches the barrier
dist.barrier()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_never_arrives_is_named_and_the_run_exits():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert time.monotonic() - start < 40
    assert [p.returncode for p in procs] == [EXIT_HUNG, EXIT_HUNG], errs
    lines = [line for line in errs[0].splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.fullmatch(r"error: trainer.step_timeout_s=2: rank 0 saw no step finish for \d+ s; "
                                            r"behind: rank 1 \(last finished step 2, the others 3\)", lines[0]), errs[0]

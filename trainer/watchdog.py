"""A hung step ends the run instead of holding the job until its time limit.

Every rank reports its finished step to the process group's store (`step/<rank>`, a TCP key-value store that
works while a collective hangs) and a daemon thread watches the time since the last report. When a step takes
longer than `trainer.step_timeout_s`, the watchdog reads every rank's last step, prints one line naming the
ranks that are behind, and exits the process with EXIT_HUNG; torchrun then stops the others.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch.distributed as dist

EXIT_HUNG = 5


def _store():
    return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None


class StepWatchdog:
    def __init__(self, timeout_s: float, rank: int, world_size: int):
        self.timeout_s, self.rank, self.world_size = float(timeout_s), rank, world_size
        self._last, self._step = time.monotonic(), 0
        self._stop = threading.Event()
        self._store = _store()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)

    def start(self) -> StepWatchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """The step just finished on this rank."""
        self._last, self._step = time.monotonic(), step
        if self._store is not None:
            self._store.set(f"step/{self.rank}", str(step))

    def stop(self) -> None:
        self._stop.set()

    def last_steps(self) -> dict[int, int]:
        """Every rank's last finished step, as far as the store knows (only this rank's without a store)."""
        if self._store is None:
            return {self.rank: self._step}
        try:
            return {r: int(self._store.get(f"step/{r}")) if self._store.check([f"step/{r}"]) else 0
                    for r in range(self.world_size)}
        except RuntimeError:  # the store itself is gone
            return {self.rank: self._step}

    def _watch(self) -> None:
        while not self._stop.wait(min(self.timeout_s / 4, 10.0)):
            waited = time.monotonic() - self._last
            if waited > self.timeout_s:
                steps = self.last_steps()
                low = min(steps.values())
                behind = [r for r, s in steps.items() if s == low]
                print(f"error: trainer.step_timeout_s={self.timeout_s:g}: rank {self.rank} saw no step finish for "
                      f"{waited:.0f} s; behind: rank {', '.join(map(str, behind))} (last finished step {low}, "
                      f"the others {max(steps.values())})", file=sys.stderr, flush=True)
                os._exit(EXIT_HUNG)

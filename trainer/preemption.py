"""Stopping a run on request: SIGTERM (torchrun and SLURM pass it on), SIGUSR1 (SLURM's advance warning,
`--signal=USR1@<seconds>`) and SIGINT (Ctrl-C) ask the loop to finish the current step, write a checkpoint and
exit with EXIT_PREEMPTED. Every rank decides at the same step: the request is all-reduced (max) once per step.
A second Ctrl-C interrupts at once."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequests:
    def __init__(self):
        self.signal: int = 0  # the first signal received, 0: none
        self._previous = {}

    def install(self) -> StopRequests:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers, unless a stop was requested: then the process is about to exit, and a
        repeated SIGTERM/SIGUSR1 (SLURM and torchrun may send one to every process) must not kill it during
        teardown (Python drops its own handlers at exit; an ignored signal stays ignored)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.signal and sig != signal.SIGINT else handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal:
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    def agreed(self, device, distributed: bool) -> str | None:
        """The signal's name if any rank received one (the same answer on every rank), else None."""
        value = self.signal
        if distributed:
            flag = torch.tensor([value], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            value = int(flag.item())
        self.signal = value  # a rank that learned it from another stops (and stays deaf to it) all the same
        return signal.Signals(value).name if value else None

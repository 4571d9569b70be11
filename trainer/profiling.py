"""`trainer.profile.steps=[a, b]`: a torch.profiler trace of steps a..b (inclusive) in `<run_dir>/profile/`, one
Chrome trace per rank (`trace_rank<r>.json`, open in Perfetto or chrome://tracing), and on CUDA a memory
snapshot of the same steps (`memory_rank<r>.pickle`, for pytorch.org/memory_viz)."""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, steps, run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = (int(s) for s in steps) if steps else (0, -1)
        self.folder, self.rank, self.cuda = Path(run_dir) / "profile", rank, device.type == "cuda"
        self._profiler = None

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self._profiler.__enter__()

    def after_step(self, step: int) -> None:
        if step == self.last:
            self.stop()

    def stop(self) -> None:
        """Write what was recorded (also when the run ends before the last profiled step)."""
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(self.folder / f"trace_rank{self.rank}.json"))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.folder / f"memory_rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self._profiler = None

"""`StepPrefetcher`: a background thread that reads this rank's windows of the coming steps.

Reading, tokenizing (the tokenizers library releases the GIL) and packing run while the training thread
computes, at most `depth` steps ahead of the step handed out last (while step k trains, steps k+1..k+depth
are read), so a step does not wait for its windows once the reader keeps up. The plan of step k + depth + 1
(its window count, and the mixture weights) is taken from `step_windows` only once step k + 1 was handed out:
what the training thread decides after step k still reaches it (the loss-triggered batch size). The
read-ahead never reaches a checkpoint: `state_dict` is the position after the steps handed out. An exception
in the thread is raised again, the same object, by the `next_step` that would have received its step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

from data.substreams import RankStreams


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class StepPrefetcher:
    def __init__(self, streams: RankStreams, depth: int = 2):
        if depth < 1:
            raise ValueError(f"data: prefetch depth must be at least 1, got {depth}")
        self.streams, self.depth = streams, depth
        self._position = streams.state_dict()  # after the steps handed out
        self._ahead = False  # the streams may have read past _position (a thread ran since)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, step_windows: Iterable) -> None:
        """Read the steps ahead whose global window counts `step_windows` yields, from the current position; an
        item may also be (count, mixture weights), weights that `RankStreams.read` sets before the step's read."""
        self.stop()
        if self._ahead:
            self.streams.load_state_dict(self._position)
        self._queue, self._stop, self._slots = queue.Queue(), threading.Event(), threading.Semaphore(self.depth)
        self._thread = threading.Thread(target=self._read, name="data-prefetch", daemon=True,
                                        args=(iter(step_windows), self._queue, self._stop, self._slots))
        self._thread.start()
        self._ahead = True

    def _read(self, step_windows, out: queue.Queue, stop: threading.Event, slots: threading.Semaphore) -> None:
        try:
            while True:
                slots.acquire()  # a step read ahead of the training thread; its plan is taken only now
                if stop.is_set():
                    return
                plan = next(step_windows, None)
                if plan is None:
                    break
                count, weights = (plan, None) if isinstance(plan, int) else plan
                out.put((self.streams.read(count, weights), self.streams.state_dict()))
            out.put(_Failure(RuntimeError("data: the prefetcher ran out of planned steps")))
        except BaseException as error:  # noqa: BLE001 -- handed to the training thread
            out.put(_Failure(error))

    def next_step(self) -> list[dict]:
        """This rank's windows of the next step (waits while the thread reads them)."""
        if self._thread is None:
            raise RuntimeError("data: next_step before start")
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._thread.join()
            self._thread = None
            raise item.error
        windows, self._position = item
        self._slots.release()
        return windows

    def stop(self) -> None:
        """Stop and join the thread; what it read ahead is dropped (a later `start` reads it again)."""
        if self._thread is None:
            return
        self._stop.set()
        self._slots.release()  # wakes a thread waiting for a slot; it checks the stop flag before reading on
        self._thread.join()
        self._thread = None

    def state_dict(self) -> dict:
        """The position after the steps handed out, of every sub-stream: collective over the DP group."""
        return self.streams.gather(self._position)

    def load_state_dict(self, state) -> None:
        self.stop()
        self.streams.load_state_dict(state)
        self._position, self._ahead = self.streams.state_dict(), False

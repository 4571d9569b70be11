"""Which windows a data-parallel rank reads: the corpus's sub-streams split over the DP ranks.

Global window g (counting from the run's start) comes from sub-stream g % S (S = data.streams) and is trained
on by DP rank g % dp. With dp dividing S, rank r reads exactly the sub-streams s with s % dp == r, for every
batch size, so it reads and tokenizes only its own windows, and window g is the same window under every
layout: the union of the ranks' windows of a step is what one process reads. The data position is the global
window count plus every sub-stream's position; `gather` collects them all on every DP rank (rank 0 saves
them), and a run resumed under another dp loads the ones its ranks now own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.distributed as dist

from data.errors import ConfigError, positive_int
from data.stream import DataSource


def check_streams(num_streams, dp: int) -> None:
    if positive_int(num_streams, "data.streams") % dp:
        raise ConfigError(f"data.streams={num_streams} is not divisible by the data-parallel size {dp} "
                          f"(world size / (parallel.tp x parallel.cp x parallel.pp)); use a multiple of it")


class RankStreams:
    """The sub-streams of DP rank `dp_rank` of `dp` (built, hence read, only here) and its windows of each step.

    `group`: the DP group (None: the default group) that `gather` collects the sub-streams' positions over.
    """

    def __init__(self, source: DataSource, dp: int = 1, dp_rank: int = 0, group=None):
        check_streams(source.num_streams, dp)
        self.num_streams, self.dp, self.dp_rank, self.group = source.num_streams, dp, dp_rank, group
        self.streams = {s: source.stream(s) for s in range(dp_rank, self.num_streams, dp)}
        self.windows = 0  # global windows (all ranks') before the next step

    def read(self, count: int, weights: Mapping[str, float] | None = None) -> list[dict]:
        """This rank's windows among the next `count` global windows (a multiple of dp), in global order;
        `weights`: the mixture's weights for them (`MixtureStream.set_weights` of every sub-stream)."""
        if count % self.dp:
            raise ValueError(f"data: a step of {count} windows does not split over {self.dp} data-parallel ranks")
        if weights is not None:
            for stream in self.streams.values():
                stream.set_weights(weights)
        first = self.windows + self.dp_rank
        mine = [self.streams[g % self.num_streams].next_window() for g in range(first, self.windows + count, self.dp)]
        self.windows += count
        return mine

    def state_dict(self) -> dict:
        """The position of this rank's sub-streams (`gather` adds the other ranks')."""
        return {"streams": self.num_streams, "windows": self.windows,
                "sub_streams": {str(s): stream.state_dict() for s, stream in self.streams.items()}}

    def gather(self, state: dict) -> dict:
        """`state` (this rank's `state_dict`) with every DP rank's sub-streams; collective over the DP group."""
        if self.dp == 1:
            return state
        states = [None] * self.dp
        dist.all_gather_object(states, state, group=self.group)
        merged = {key: value for part in states for key, value in part["sub_streams"].items()}
        return {**state, "sub_streams": dict(sorted(merged.items(), key=lambda item: int(item[0])))}

    def load_state_dict(self, state) -> None:
        """Resume from a gathered position, saved under any dp; this rank loads the sub-streams it owns."""
        if "sub_streams" not in state:
            raise ValueError("data: the checkpoint's data position predates data.streams (one sequential stream)")
        if state["streams"] != self.num_streams:
            raise ValueError(f"data.streams: the checkpoint's run read {state['streams']} sub-streams, this one "
                             f"{self.num_streams}; resume with data.streams={state['streams']}")
        missing = [s for s in self.streams if str(s) not in state["sub_streams"]]
        if missing:
            raise ValueError(f"data: the checkpoint holds no position for sub-stream(s) {missing}")
        for s, stream in self.streams.items():
            stream.load_state_dict(state["sub_streams"][str(s)])
        self.windows = int(state["windows"])

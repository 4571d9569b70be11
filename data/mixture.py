"""Long-context mixtures: windows drawn from several streams by weight (MiniMax-01 Table 6).

Each source is its own `WindowStream`, typically one corpus split into short / medium / long
document buckets with `min_doc_tokens` / `max_doc_tokens`. Every window comes whole from one
source, chosen by a seeded draw; the draw is a function of (seed, part, draw number), so the mixture's
state is just the draw count, the weights and each source's state. `part` is the sub-stream's number
(`data.substreams`): each sub-stream draws its own sequence, so the windows of one global batch do not
all come from one source. `MixtureTransition` gives the weights of each step of a stage whose mixture moves
linearly from the previous stage's (stage.previous_mixture) over its first stage.transition_tokens tokens; the
trainer hands them to the reader with each step's window count, which calls `set_weights` before reading it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from data.errors import ConfigError


def normalized_weights(weights: Mapping[str, float], names, setting: str = "data.mixture") -> dict[str, float]:
    unknown = set(weights) - set(names)
    if unknown:
        raise ConfigError(f"{setting}: unknown source(s) {', '.join(sorted(unknown))} "
                          f"(sources: {', '.join(names)})")
    values = {name: float(weights.get(name, 0.0)) for name in names}
    if any(v < 0 or not np.isfinite(v) for v in values.values()) or sum(values.values()) <= 0:
        raise ConfigError(f"{setting}: weights must be finite, non-negative and not all zero, got {dict(weights)}")
    total = sum(values.values())
    return {name: v / total for name, v in values.items()}


def interpolate_weights(start: Mapping[str, float], end: Mapping[str, float], fraction: float) -> dict[str, float]:
    """Weights a fraction of the way from `start` to `end` (clipped to [0, 1]); missing names are 0."""
    t = min(1.0, max(0.0, float(fraction)))
    names = sorted(set(start) | set(end))
    return {n: (1 - t) * float(start.get(n, 0.0)) + t * float(end.get(n, 0.0)) for n in names}


class MixtureTransition:
    """The mixture weights of a step by the tokens seen before it: linear from `start` to `end` over the first
    `tokens` tokens of the run (0: `end` from the start), then `end`."""

    def __init__(self, start: Mapping[str, float], end: Mapping[str, float], tokens: int,
                 setting: str = "stage.previous_mixture"):
        self.end = normalized_weights(end, list(end))
        self.start = normalized_weights(start, list(self.end), setting)
        self.tokens = int(tokens)

    def weights(self, tokens_seen: int) -> dict[str, float]:
        fraction = tokens_seen / self.tokens if self.tokens else 1.0
        return interpolate_weights(self.start, self.end, fraction)


class MixtureStream:
    """next_window() from one of `streams`, picked with probability proportional to its weight."""

    def __init__(self, streams: Mapping, weights: Mapping[str, float], seed: int = 0, part: int = 0):
        if not streams:
            raise ConfigError("data.mixture: no sources")
        self.streams = dict(streams)
        self.names = list(self.streams)
        self.seed, self.part = int(seed), int(part)
        self.draws = 0
        self.counts = {name: 0 for name in self.names}
        self.last_source = None
        self.set_weights(weights)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        self.weights = normalized_weights(weights, self.names)

    def _choose(self) -> str:
        # A uniform number from the raw PCG64 stream of (seed, part, draw number): stable across numpy versions.
        raw = int(np.random.PCG64(np.random.SeedSequence([self.seed, self.part, self.draws])).random_raw())
        u = (raw >> 11) * 2.0**-53
        cumulative = np.cumsum([self.weights[n] for n in self.names])
        pick = min(int(np.searchsorted(cumulative, u, side="right")), len(self.names) - 1)
        while self.weights[self.names[pick]] == 0:  # float round-off at the top end
            pick -= 1
        return self.names[pick]

    def next_window(self) -> dict:
        name = self._choose()
        self.draws += 1
        self.counts[name] += 1
        self.last_source = name
        return self.streams[name].next_window()

    def __iter__(self):
        while True:
            yield self.next_window()

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "draws": self.draws,
            "weights": dict(self.weights),
            "counts": dict(self.counts),
            "streams": {name: s.state_dict() for name, s in self.streams.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        if set(state["streams"]) != set(self.names):
            raise ValueError(f"data.mixture: the checkpoint has sources {sorted(state['streams'])}, "
                             f"this run has {sorted(self.names)}")
        if state["seed"] != self.seed:
            raise ValueError(f"data.seed: the checkpoint's mixture used seed {state['seed']}, not {self.seed}")
        self.draws = int(state["draws"])
        self.counts = {name: int(state["counts"].get(name, 0)) for name in self.names}
        self.set_weights(state["weights"])
        for name, stream in self.streams.items():
            stream.load_state_dict(state["streams"][name])

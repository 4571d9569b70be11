"""The LR schedule (WSD family; docs/architecture.md, 'Training') and the batch-size warmup in tokens.

The LR is a small pure function of (step, tokens seen) rather than megatron-core's
OptimizerParamScheduler: its WSD style has no intermediate step-down (2e-4 -> 1.3e-4 in MiniMax-01)
and its "exponential" anneal is 2 * 0.5^r - 1, not a decay to a floor. A pure function also needs no
state in the checkpoint beyond the step and token counters, and stays right when a resumed run
extends trainer.steps (the stable phase simply gets longer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ConfigError


@dataclass(frozen=True)
class LRSchedule:
    peak: float
    total_steps: int
    warmup_steps: int = 0
    drop_ratio: float = 1.0
    drop_at_step: int | None = None
    drop_at_tokens: int | None = None
    decay_steps: int = 0
    min_ratio: float = 1.0

    @classmethod
    def from_config(cls, peak: float, total_steps: int, lr_cfg) -> LRSchedule:
        get = lr_cfg.get
        sched = cls(
            peak=float(peak), total_steps=int(total_steps),
            warmup_steps=int(get("warmup_steps", 0) or 0),
            drop_ratio=float(get("drop_ratio", 1.0) if get("drop_ratio") is not None else 1.0),
            drop_at_step=get("drop_at_step"), drop_at_tokens=get("drop_at_tokens"),
            decay_steps=int(get("decay_steps", 0) or 0),
            min_ratio=float(get("min_ratio", 1.0) if get("min_ratio") is not None else 1.0),
        )
        sched.validate()
        return sched

    def validate(self) -> None:
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("schedule.lr.warmup_steps and schedule.lr.decay_steps must be >= 0")
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ConfigError(
                f"schedule.lr.warmup_steps={self.warmup_steps} + schedule.lr.decay_steps={self.decay_steps} "
                f"exceed trainer.steps={self.total_steps}")
        if not 0 < self.drop_ratio <= 1 or not 0 < self.min_ratio <= 1:
            raise ConfigError("schedule.lr.drop_ratio and schedule.lr.min_ratio must be in (0, 1]")
        if self.drop_at_step is not None and self.drop_at_tokens is not None:
            raise ConfigError("schedule.lr: set drop_at_step or drop_at_tokens, not both")

    def __call__(self, step: int, tokens_seen: int) -> float:
        """LR of optimizer step `step` (1-based), taken when `tokens_seen` tokens were consumed before it."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.peak * step / self.warmup_steps
        dropped = (self.drop_at_step is not None and step > self.drop_at_step) or (
            self.drop_at_tokens is not None and tokens_seen >= self.drop_at_tokens)
        stable = self.peak * (self.drop_ratio if dropped else 1.0)
        decay_start = self.total_steps - self.decay_steps
        if self.decay_steps and step > decay_start:
            # exponential from the stable value down to min_ratio * peak over the final decay_steps
            floor = min(self.peak * self.min_ratio, stable)
            progress = (step - decay_start) / self.decay_steps
            return stable * math.pow(floor / stable, progress)
        return stable


@dataclass(frozen=True)
class BatchSchedule:
    """Global batch size in tokens as a step function of tokens seen: [(threshold, global_batch_tokens), ...]."""

    entries: tuple[tuple[int, int], ...]

    @classmethod
    def from_config(cls, batch_cfg) -> BatchSchedule:
        entries = []
        for i, entry in enumerate(batch_cfg or []):
            try:
                tokens, batch = int(entry["tokens"]), int(entry["global_batch_tokens"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"schedule.batch[{i}] must be {{tokens: int, global_batch_tokens: int}}") from None
            entries.append((tokens, batch))
        if not entries or entries[0][0] != 0:
            raise ConfigError("schedule.batch must be a non-empty list whose first entry has tokens: 0")
        for i in range(1, len(entries)):
            if entries[i][0] <= entries[i - 1][0]:
                raise ConfigError(f"schedule.batch[{i}].tokens={entries[i][0]} must increase")
        for i, (_, batch) in enumerate(entries):
            if batch <= 0:
                raise ConfigError(f"schedule.batch[{i}].global_batch_tokens={batch} must be positive")
        return cls(tuple(entries))

    def global_batch_tokens(self, tokens_seen: int) -> int:
        batch = self.entries[0][1]
        for threshold, size in self.entries:
            if tokens_seen >= threshold:
                batch = size
        return batch

    def check_divisible(self, micro_batch_size: int, seq_len: int, dp: int) -> None:
        unit = micro_batch_size * seq_len * dp
        for i, (_, batch) in enumerate(self.entries):
            if batch % unit:
                raise ConfigError(
                    f"schedule.batch[{i}].global_batch_tokens={batch} is not divisible by trainer.micro_batch_size"
                    f"={micro_batch_size} x stage.seq_len={seq_len} x data-parallel size={dp} (= {unit})")

    def micro_batches_per_rank(self, tokens_seen: int, micro_batch_size: int, seq_len: int, dp: int) -> int:
        return self.global_batch_tokens(tokens_seen) // (micro_batch_size * seq_len * dp)

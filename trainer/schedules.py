"""The LR schedule (WSD family; docs/architecture.md, 'Training') and the batch-size warmup (by tokens or loss).

The LR is a small pure function of (step, tokens seen) rather than megatron-core's
OptimizerParamScheduler: its WSD style has no intermediate step-down (2e-4 -> 1.3e-4 in MiniMax-01)
and its "exponential" anneal is 2 * 0.5^r - 1, not a decay to a floor. A pure function also needs no
state in the checkpoint beyond the step and token counters, and stays right when a resumed run
extends trainer.steps (the stable phase simply gets longer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise

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


LOSS_EMA = 0.9  # loss_below compares ema = 0.9 * ema + 0.1 * loss (about the last 10 steps), from the first step's loss
LOSS_SWITCH_DELAY = 2  # steps the data reader reads ahead (data.prefetch depth): a decision cannot reach them


@dataclass(frozen=True)
class LossBelow:
    """A batch entry's trigger: the smoothed training loss below `value`."""

    value: float


class BatchSchedule:
    """The global batch in tokens of each step: `entries` [(trigger, global_batch_tokens)], reached in order.

    A trigger is a token count (the entry applies from the first step that starts with at least that many tokens
    seen) or `LossBelow(v)`: when the smoothed loss (LOSS_EMA) after step k is below v while the entry before it is
    in effect, the entry applies from step k + 1 + LOSS_SWITCH_DELAY on; steps k + 1 and k + 2 keep the batch they
    were read with. The loss is the step's loss reduced over all ranks, so every rank decides alike. An entry is
    reached only after the ones before it. `state_dict` (the smoothed loss and the switches decided) goes into
    checkpoints, so a resumed run neither switches again nor forgets a switch.
    """

    def __init__(self, entries):
        self.entries = tuple(entries)
        self.loss_ema: float | None = None
        self.loss_switches: dict[int, int] = {}  # entry index -> the first step with its batch

    @classmethod
    def from_config(cls, batch_cfg) -> BatchSchedule:
        entries = []
        for i, entry in enumerate(batch_cfg or []):
            where = f"schedule.batch[{i}]"
            if not isinstance(entry, Mapping) or "global_batch_tokens" not in entry or set(entry) - _BATCH_KEYS:
                raise ConfigError(f"{where} must be {{tokens: int, global_batch_tokens: int}} or "
                                  f"{{loss_below: number, global_batch_tokens: int}}, got {entry}")
            if ("tokens" in entry) == ("loss_below" in entry):
                raise ConfigError(f"{where} must have one of tokens and loss_below, "
                                  f"{'not both' if 'tokens' in entry else 'got neither'}")
            batch = _whole_number(entry["global_batch_tokens"], f"{where}.global_batch_tokens")
            if "tokens" in entry:
                trigger = _whole_number(entry["tokens"], f"{where}.tokens")
            else:
                value = entry["loss_below"]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                    raise ConfigError(f"{where}.loss_below={value!r} must be a positive number")
                trigger = LossBelow(float(value))
            entries.append((trigger, batch))
        if not entries or entries[0][0] != 0:
            raise ConfigError("schedule.batch must be a non-empty list whose first entry has tokens: 0")
        tokens = [(i, t) for i, (t, _) in enumerate(entries) if not isinstance(t, LossBelow)]
        for (_, before), (i, t) in pairwise(tokens):
            if t <= before:
                raise ConfigError(f"schedule.batch[{i}].tokens={t} must increase")
        for i, (_, batch) in enumerate(entries):
            if batch <= 0:
                raise ConfigError(f"schedule.batch[{i}].global_batch_tokens={batch} must be positive")
        return cls(entries)

    @property
    def has_loss_entries(self) -> bool:
        return any(isinstance(trigger, LossBelow) for trigger, _ in self.entries)

    def entry_at(self, tokens_seen: int, step: int = 0) -> int:
        """The index of the entry in effect at step `step` (1-based), which starts with `tokens_seen` tokens."""
        index = 0
        for i, (trigger, _) in enumerate(self.entries[1:], start=1):
            if isinstance(trigger, LossBelow):
                reached = self.loss_switches.get(i, math.inf) <= step
            else:
                reached = tokens_seen >= trigger
            if not reached:
                break
            index = i
        return index

    def global_batch_tokens(self, tokens_seen: int, step: int = 0) -> int:
        return self.entries[self.entry_at(tokens_seen, step)][1]

    def observe_loss(self, step: int, tokens_seen: int, loss: float) -> tuple[int, int] | None:
        """Smooth the loss of step `step` (which started with `tokens_seen` tokens); when that schedules the next
        entry, returns (its index, the first step with its batch)."""
        self.loss_ema = loss if self.loss_ema is None else LOSS_EMA * self.loss_ema + (1 - LOSS_EMA) * loss
        following = self.entry_at(tokens_seen, step) + 1
        if following == len(self.entries) or following in self.loss_switches:
            return None
        trigger = self.entries[following][0]
        if not isinstance(trigger, LossBelow) or not self.loss_ema < trigger.value:
            return None
        self.loss_switches[following] = step + 1 + LOSS_SWITCH_DELAY
        return following, self.loss_switches[following]

    def state_dict(self) -> dict:
        return {"loss_ema": self.loss_ema, "loss_switches": dict(self.loss_switches)}

    def load_state_dict(self, state: Mapping) -> None:
        self.loss_ema = state["loss_ema"]
        self.loss_switches = {int(i): int(step) for i, step in state["loss_switches"].items()}

    def check_divisible(self, micro_batch_size: int, seq_len: int, dp: int) -> None:
        unit = micro_batch_size * seq_len * dp
        for i, (_, batch) in enumerate(self.entries):
            if batch % unit:
                raise ConfigError(
                    f"schedule.batch[{i}].global_batch_tokens={batch} is not divisible by trainer.micro_batch_size"
                    f"={micro_batch_size} x stage.seq_len={seq_len} x data-parallel size={dp} (= {unit})")

    def micro_batches_per_rank(self, tokens_seen: int, micro_batch_size: int, seq_len: int, dp: int,
                               step: int = 0) -> int:
        return self.global_batch_tokens(tokens_seen, step) // (micro_batch_size * seq_len * dp)


_BATCH_KEYS = {"tokens", "loss_below", "global_batch_tokens"}


def _whole_number(value, setting: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value % 1:
        raise ConfigError(f"{setting}={value!r} must be an integer")
    return int(value)

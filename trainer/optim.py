"""The learning rate of the optimizer's param groups (the optimizer itself: `parallel.optimizer`)."""

from __future__ import annotations


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

"""AdamW with Megatron's weight-decay rule and the fastest available implementation."""

from __future__ import annotations

import torch

from .config import ConfigError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Megatron's rule: no weight decay on 1-D parameters (norm scales, biases); decay on matrices."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, optim_cfg) -> tuple[torch.optim.Optimizer, str]:
    """Returns the optimizer and the name of the implementation in use (apex, fused or foreach)."""
    groups = param_groups(model, float(optim_cfg.weight_decay))
    kwargs = {"lr": float(optim_cfg.lr), "betas": tuple(float(b) for b in optim_cfg.betas), "eps": float(optim_cfg.eps)}
    impl = optim_cfg.impl
    device_type = next(model.parameters()).device.type

    if impl in ("auto", "apex") and device_type == "cuda":
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs), "apex"
        except ImportError:
            if impl == "apex":
                raise ConfigError("optim.impl=apex but apex is not installed") from None
    if impl == "apex":
        raise ConfigError("optim.impl=apex needs a CUDA device")
    if impl in ("auto", "fused"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs), "fused"
        except (RuntimeError, ValueError) as exc:  # fused kernels are missing for some device/dtype pairs
            if impl == "fused":
                raise ConfigError(f"optim.impl=fused is not supported here: {exc}") from None
    return torch.optim.AdamW(groups, foreach=True, **kwargs), "foreach"


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

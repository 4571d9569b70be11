"""Process environment from torchrun, the process group, and the plain data-parallel helpers.

`parallel=single` runs plain data parallelism when world > 1: every rank holds the whole model, takes its share
of the global batch, and gradients are summed with all_reduce (`wrap_model`, `sum_gradients`). Every other
layout goes through parallel/ (`trainer.layout.ParallelLayout`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    def read(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise ConfigError(f"environment: {name}={os.environ[name]!r} is not an integer") from None

    return DistEnv(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))


def pick_device(requested: str, env: DistEnv) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", env.local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


_owns_process_group = False  # set when init_process_group created the group (a caller may have made its own)


def init_process_group(env: DistEnv, device: torch.device) -> None:
    """gloo on CPU, nccl on CUDA; a no-op for a single process or when the caller already made the group."""
    global _owns_process_group
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.distributed and not dist.is_initialized():
        # CUDA runs also get gloo for the few small CPU tensors the loop reduces (token counts, metrics)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
        _owns_process_group = True


def shutdown() -> None:
    """Destroy the process group if this module created it (tests run the trainer inside their own group)."""
    global _owns_process_group
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def wrap_model(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """parallel=single: the whole model on every rank, starting identical even if initialisation were not."""
    from parallel.parallelize import broadcast_parameters

    broadcast_parameters(model)
    return model


def sum_gradients(params: list[torch.nn.Parameter], env: DistEnv) -> None:
    """Sum gradients over data-parallel replicas (the loss is already normalised by the global token count).

    One flattened all_reduce per dtype keeps the call count small (parallel layouts use parallel's bucketed,
    overlapped GradSync instead).
    """
    if not env.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

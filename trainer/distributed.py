"""Process environment from torchrun, the device, and the process group (the layout itself: `trainer.layout`)."""

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


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float = 1800) -> None:
    """gloo on CPU, nccl on CUDA; a no-op for a single process or when the caller already made the group.
    timeout_s: a collective that waits longer fails (NCCL's async error handling aborts the communicator)."""
    global _owns_process_group
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.distributed and not dist.is_initialized():
        # CUDA runs also get gloo for the few small CPU tensors the loop reduces (token counts, metrics)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s or 1800), **kwargs)
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

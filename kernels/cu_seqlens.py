"""Document boundaries on the host, read once per batch rather than once per layer."""

import itertools
import weakref

import torch

_last: tuple = (None, -1, None)  # (weakref to the tensor, its version counter, the list)


def cu_seqlens_list(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as a Python list. A model passes one tensor to every layer; reading a CUDA tensor costs a
    device sync, so the last tensor's list is kept (keyed by identity and in-place version, never by value)."""
    global _last
    if cu_seqlens.is_inference():  # no version counter to key the cache on; inference does not need it
        return [int(x) for x in cu_seqlens.tolist()]
    ref, version, values = _last
    if ref is not None and ref() is cu_seqlens and version == cu_seqlens._version:
        return values
    values = [int(x) for x in cu_seqlens.tolist()]
    _last = (weakref.ref(cu_seqlens), cu_seqlens._version, values)
    return values


def remember_cu_seqlens(cu_seqlens: torch.Tensor, host_copy: torch.Tensor) -> None:
    """Prime cu_seqlens_list with the host tensor a device `cu_seqlens` was copied from (saves its sync)."""
    global _last
    if not cu_seqlens.is_inference():
        _last = (weakref.ref(cu_seqlens), cu_seqlens._version, [int(x) for x in host_copy.tolist()])


def checked_cu_seqlens(name: str, cu_seqlens, total: int, total_name: str = "") -> list[int]:
    """Validate document boundaries [N+1] over `total` tokens and return them as a host list."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1-D integer tensor [N+1] with N >= 1")
    if cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {cu_seqlens.dtype}")
    cu = cu_seqlens_list(cu_seqlens)
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at {total_name}{total}, got {cu[0]} .. {cu[-1]}")
    if any(b < a for a, b in itertools.pairwise(cu)):
        raise ValueError(f"{name} must be non-decreasing, got {cu}")
    return cu

"""Document boundaries on the host, read once per batch rather than once per layer."""

import weakref

import torch

_last: tuple = (None, -1, None)  # (weakref to the tensor, its version counter, the list)


def cu_seqlens_list(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as a Python list. A model passes one tensor to every layer; reading a CUDA tensor costs a
    device sync, so the last tensor's list is kept (keyed by identity and in-place version, never by value)."""
    global _last
    ref, version, values = _last
    if ref is not None and ref() is cu_seqlens and version == cu_seqlens._version:
        return values
    values = [int(x) for x in cu_seqlens.tolist()]
    _last = (weakref.ref(cu_seqlens), cu_seqlens._version, values)
    return values

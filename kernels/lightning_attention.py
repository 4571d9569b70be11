"""Public lightning attention entry: the Triton kernel on CUDA, the chunked reference elsewhere.

`MINIMAX_LIGHTNING_BACKEND=reference|triton` forces a backend (e.g. the reference on GPU
for debugging, or Triton on CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import warnings

import torch

from kernels.lightning_reference import lightning_attention_chunked

__all__ = ["BACKEND_ENV_VAR", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "lightning_attention"]

BACKEND_ENV_VAR = "MINIMAX_LIGHTNING_BACKEND"
_BACKENDS = ("reference", "triton")
# What the Triton kernel handles (defined here, where no Triton import is needed; lightning_triton re-exports).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_warned_triton_missing = False
_warned_unsupported = False


def _load_triton_kernel(required: bool):
    """Return the Triton entry, or None (with a one-time warning) when it cannot be imported."""
    global _warned_triton_missing
    try:
        from kernels.lightning_triton import lightning_attention_triton
    except ImportError as err:
        if required:
            raise ImportError(
                f"{BACKEND_ENV_VAR}=triton but the Triton kernel cannot be imported: {err}"
            ) from err
        if not _warned_triton_missing:
            warnings.warn(
                f"lightning attention: Triton kernel unavailable ({err}); using the PyTorch reference"
            )
            _warned_triton_missing = True
        return None
    return lightning_attention_triton


def _triton_supports(q, v) -> bool:
    """Shapes and dtypes the Triton kernel handles; anything else takes the reference (warned once)."""
    global _warned_unsupported
    ok = q.shape[-1] in SUPPORTED_HEAD_DIMS and v.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES
    if not ok and not _warned_unsupported:
        warnings.warn(f"lightning attention: head dims {q.shape[-1]}/{v.shape[-1]} in {q.dtype} are not supported "
                      f"by the Triton kernel (head dims {SUPPORTED_HEAD_DIMS}); using the slower PyTorch reference")
        _warned_unsupported = True
    return ok


def lightning_attention(
    q, k, v, slope, cu_seqlens=None, initial_state=None, output_final_state=False, block_size=64
):
    """Lightning attention over packed documents (see kernels/lightning_reference.py for the math).

    q, k [T, H, d_k], v [T, H, d_v], slope [H], cu_seqlens [N+1] or None, initial_state
    [N, H, d_k, d_v] fp32 or None. Returns (o [T, H, d_v] in q.dtype, final_state fp32 or None).
    `block_size` only applies to the reference; the Triton kernel picks its own.
    """
    forced = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
    if forced and forced not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV_VAR} must be one of {_BACKENDS}, got {forced!r}")
    use_triton = forced == "triton" or (not forced and q.is_cuda and _triton_supports(q, v))
    if use_triton:
        kernel = _load_triton_kernel(required=forced == "triton")
        if kernel is not None:
            return kernel(q, k, v, slope, cu_seqlens, initial_state, output_final_state)
    return lightning_attention_chunked(
        q, k, v, slope, cu_seqlens, initial_state, output_final_state, block_size=block_size
    )

"""Lightning attention on the GPU: Triton forward and backward behind one autograd.Function.

    lightning_attention_triton(q, k, v, slope, cu_seqlens=None, initial_state=None,
                               output_final_state=False) -> (o, final_state)

Same math and API as kernels/lightning_reference.py (docs/architecture.md, 'The model'): q, k [T, H, d_k], v [T, H, d_v]
(packed documents, batch flattened) in bf16, fp16 or fp32; slope [H] (lambda_h = exp(-slope_h));
cu_seqlens [N+1] (None: one document); initial_state [N, H, d_k, d_v] (fp32, gradient
returned); o [T, H, d_v] in q.dtype; final_state [N, H, d_k, d_v] fp32 or None.
Head dims 16, 32, 64, 128 (d_k and d_v independently). Anything else raises ValueError.

Algorithm (kernels in lightning_triton_fwd.py / lightning_triton_bwd.py): every document is cut
into segments of `segment_size` tokens (a multiple of the chunk size; the last one of a document
may be shorter), so no segment or chunk spans two documents. Local segment states, one scan over
each document's segments, then one program per (segment, head, column block) that walks the
segment chunk by chunk with the state in registers. Only one fp32 state per segment reaches
memory, instead of one per 64-token chunk. The backward saves nothing but q, k, v and the
per-segment states. One host sync per call reads cu_seqlens (as fla's varlen path does).

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from kernels.lightning_attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from kernels.lightning_reference import check_lightning_inputs
from kernels.lightning_triton_bwd import bwd_dkdv, bwd_dq
from kernels.lightning_triton_fwd import INTERPRET, fwd_output, segment_kv, segment_scan

__all__ = ["SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "TUNING", "lightning_attention_triton"]


# Knobs the benchmark sweeps; None = chosen from the problem size (see _segment_size).
TUNING = {
    "chunk": 64,  # tokens per chunk (intra-chunk work is a [chunk, chunk] matrix)
    "segment": None,  # tokens per segment; a multiple of chunk
    "max_segment": 4096,
    "kv_block": 64,  # column blocks: a program owns block x d of the state
    "out_block": 64,
    "dq_block": 64,
    "dkdv_block": 64,
}


@dataclass(frozen=True)
class _Config:
    chunk: int
    segment: int
    prec: str  # tl.dot input precision (_dot_precision)
    upcast: bool  # interpreter only: bf16 dot operands go to fp32 (its bf16 dot is broken)
    kv_block: int
    out_block: int
    dq_block: int
    dkdv_block: int


def _dot_precision(dtype, upcast):
    """tl.dot input precision: fp32 inputs use 3xTF32 on the GPU (about fp32 accuracy on the
    tensor cores) and exact products under the interpreter; 16-bit inputs ignore it."""
    if upcast or (dtype == torch.float32 and INTERPRET):
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _segment_size(T: int, H: int, chunk: int) -> int:
    """Power of two near 8 * sqrt(T * H / 64), within [4 * chunk, max_segment].

    Longer segments mean fewer states in memory and a shorter scan, shorter ones more programs.
    Measured on an H200 (H=64, d=128, bf16; bench/NOTES_lightning.md): 512, 1024, 2048, 4096
    tokens were fastest at T = 4K, 16K, 64K, 256K, which this formula reproduces.
    """
    target = 8.0 * math.sqrt(max(T * H, 1) / 64.0)
    seg = 2 ** round(math.log2(target))
    return int(min(max(seg, 4 * chunk), max(TUNING["max_segment"], 4 * chunk)))


@functools.lru_cache(maxsize=64)
def _segment_layout(cu: tuple[int, ...], seg: int, device: torch.device):
    """seg_bounds int32 [n_segs, 2] (start, end) and doc_segs int32 [N+1] (first segment of each doc)."""
    bounds, doc_segs = [], [0]
    for a, b in itertools.pairwise(cu):
        bounds.extend((s0, min(s0 + seg, b)) for s0 in range(a, b, seg))
        doc_segs.append(len(bounds))
    seg_bounds = torch.tensor(bounds, dtype=torch.int32).reshape(-1, 2).to(device)
    return seg_bounds, torch.tensor(doc_segs, dtype=torch.int32).to(device), len(bounds)


def _check(q, k, v, slope, cu_seqlens, initial_state) -> list[int]:
    cu = check_lightning_inputs(q, k, v, slope, cu_seqlens, initial_state)
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"lightning_attention_triton: q, k, v must share one dtype of {SUPPORTED_DTYPES}, "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    for name, d in (("d_k", q.shape[2]), ("d_v", v.shape[2])):
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"lightning_attention_triton: {name}={d} unsupported; use one of {SUPPORTED_HEAD_DIMS}")
    tensors = [q, k, v, slope] + [t for t in (cu_seqlens, initial_state) if t is not None]
    if any(t.device != q.device for t in tensors):
        raise ValueError("lightning_attention_triton: all tensors must be on one device")
    if not q.is_cuda and not INTERPRET:
        raise ValueError("lightning_attention_triton needs CUDA tensors (CPU only under TRITON_INTERPRET=1)")
    return cu


def _forward(q, k, v, slope, layout, cfg, initial_state, output_final_state):
    seg_bounds, doc_segs, n_segs = layout
    n_docs = doc_segs.numel() - 1
    states = segment_kv(k, v, slope, seg_bounds, n_segs, cfg)
    final = None
    if output_final_state:
        final = q.new_empty(n_docs, q.shape[1], q.shape[2], v.shape[2], dtype=torch.float32)
    segment_scan(states, slope, seg_bounds, doc_segs, n_docs, initial_state, final, reverse=False)
    o = fwd_output(q, k, v, slope, seg_bounds, states, n_segs, cfg)
    return o, final, states


class _LightningAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, initial_state, output_final_state, layout, cfg):
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        o, final, states = _forward(q, k, v, slope, layout, cfg, h0, output_final_state)
        ctx.save_for_backward(q, k, v, slope, states)
        ctx.layout, ctx.cfg = layout, cfg
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, slope, states = ctx.saved_tensors
        seg_bounds, doc_segs, n_segs = ctx.layout
        cfg = ctx.cfg
        n_docs = doc_segs.numel() - 1
        do = do.contiguous()
        dht = dht.float().contiguous() if dht is not None else None
        dq, dstates = bwd_dq(q, k, v, do, slope, seg_bounds, states, n_segs, cfg)
        dh0 = None
        if ctx.h0_dtype is not None:
            dh0 = states.new_empty(n_docs, q.shape[1], q.shape[2], v.shape[2])
        segment_scan(dstates, slope, seg_bounds, doc_segs, n_docs, dht, dh0, reverse=True)
        dk, dv = bwd_dkdv(q, k, v, do, slope, seg_bounds, dstates, n_segs, cfg)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, None, dh0, None, None, None


def lightning_attention_triton(
    q, k, v, slope, cu_seqlens=None, initial_state=None, output_final_state=False,
    *, chunk_size=None, segment_size=None,
):
    """Lightning attention with Triton kernels (module docstring). `chunk_size` (a power of two
    >= 16) and `segment_size` (a multiple of it) override TUNING, for tests and sweeps."""
    cu = _check(q, k, v, slope, cu_seqlens, initial_state)
    T, H, DK = q.shape
    DV = v.shape[2]
    if T == 0:
        final = None
        if output_final_state:
            final = (initial_state.float().clone() if initial_state is not None
                     else q.new_zeros(len(cu) - 1, H, DK, DV, dtype=torch.float32))
        return q.new_zeros(0, H, DV), final

    chunk = chunk_size or TUNING["chunk"]
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk}")
    seg = segment_size or TUNING["segment"] or _segment_size(T, H, chunk)
    if seg % chunk:
        raise ValueError(f"segment_size {seg} must be a multiple of chunk_size {chunk}")
    upcast = INTERPRET and q.dtype == torch.bfloat16
    cfg = _Config(
        chunk=chunk, segment=seg, prec=_dot_precision(q.dtype, upcast),
        upcast=upcast, kv_block=TUNING["kv_block"], out_block=TUNING["out_block"],
        dq_block=TUNING["dq_block"], dkdv_block=TUNING["dkdv_block"],
    )
    layout = _segment_layout(tuple(cu), seg, q.device)
    slope32 = slope.detach().to(torch.float32).contiguous()
    o, final = _LightningAttentionTriton.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), slope32, initial_state,
        bool(output_final_state), layout, cfg,
    )
    return o, final

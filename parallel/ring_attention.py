"""Varlen ring attention for the softmax layers over the zigzag context-parallel layout (docs/architecture.md, 'Parallel layouts').

Every rank keeps its queries; the K/V of all CP ranks travel once around the ring (asynchronous P2P,
overlapped with the attention of the block that has just arrived). A local query token attends a key
iff both are in the same document and the key's global position is not after the query's. On the
zigzag layout this reduces to two kinds of varlen blocks, never to a dense mask:
- step 0 (own K/V): causal attention within the local segments (documents cut at the chunk edges);
- every step: each local chunk whose first document started in an earlier chunk attends, non-causally,
  with that first segment to the keys of the same document held by the visiting rank. Two chunks share
  at most one document, and on the visiting rank those keys are one contiguous range.
Partial results merge through their log-sum-exp in fp32. Backward: K/V go around the ring again and
dK/dV travel with them, arriving home after the last step.

Block core: `torch.nn.attention.varlen.varlen_attn` forward and the flash backward with the merged
output and LSE on CUDA bf16/fp16; the PyTorch reference (forward) and a dense per-document backward
elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.softmax_attention import _varlen_attn_api, softmax_attention_varlen
from parallel.collectives import group_rank, group_size
from parallel.zigzag import LocalChunk, describe_local_chunks, zigzag_chunk_ids

__all__ = ["ring_attention"]

_KV_TAG, _DKV_TAG = 0, 1


# ---------------------------------------------------------------- block core


def _use_flash(q) -> bool:
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _varlen_attn_api() is not None
            and hasattr(torch.ops.aten, "_flash_attention_backward"))


def _block_forward(q, k, v, cu_q, cu_k, causal, scale):
    """(o [Tq, H, d], lse [H, Tq] fp32) of one varlen call; rows that see no key get lse = -inf."""
    o, lse = softmax_attention_varlen(q, k, v, cu_q, scale=scale, causal=causal, cu_seqlens_k=cu_k)
    return o, lse.float()


def _segments(cu_q, cu_k):
    return zip(cu_q.tolist()[:-1], cu_q.tolist()[1:], cu_k.tolist()[:-1], cu_k.tolist()[1:])


def _block_backward_reference(do, q, k, v, o, lse, cu_q, cu_k, causal, scale):
    """Gradients of one block given the MERGED output o and LSE of its queries (flash-attention style)."""
    ct = torch.promote_types(q.dtype, torch.float32)
    H, Hkv, d = q.shape[1], k.shape[1], q.shape[2]
    group = H // Hkv
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=q.device)
    dv = torch.zeros(v.shape, dtype=ct, device=q.device)
    delta = (do.to(ct) * o.to(ct)).sum(-1).transpose(0, 1)  # [H, Tq]: rowsum(dO * O)
    for qs, qe, ks, ke in _segments(cu_q, cu_k):
        Lq, Lk = qe - qs, ke - ks
        if Lq == 0 or Lk == 0:
            continue
        q_seg, do_seg = q[qs:qe].to(ct), do[qs:qe].to(ct)
        k_seg = k[ks:ke].to(ct).repeat_interleave(group, dim=1)
        v_seg = v[ks:ke].to(ct).repeat_interleave(group, dim=1)
        p = torch.exp(torch.einsum("qhd,khd->hqk", q_seg, k_seg) * scale - lse[:, qs:qe, None].to(ct))
        if causal:  # bottom-right aligned, as in the forward
            visible = torch.arange(Lk, device=q.device)[None, :] <= torch.arange(Lq, device=q.device)[:, None] + Lk - Lq
            p = p.masked_fill(~visible, 0.0)
        dv_seg = torch.einsum("hqk,qhd->khd", p, do_seg)
        ds = p * (torch.einsum("qhd,khd->hqk", do_seg, v_seg) - delta[:, qs:qe, None])
        dq[qs:qe] += torch.einsum("hqk,khd->qhd", ds, k_seg) * scale
        dk[ks:ke] += (torch.einsum("hqk,qhd->khd", ds, q_seg) * scale).view(Lk, Hkv, group, d).sum(2)
        dv[ks:ke] += dv_seg.view(Lk, Hkv, group, d).sum(2)
    return dq, dk, dv


def _block_backward_flash(do, q, k, v, o, lse, cu_q, cu_k, causal, scale):
    H, Hkv, d = q.shape[1], k.shape[1], q.shape[2]
    group = H // Hkv
    k_full, v_full = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # no GQA argument
    cu_q = cu_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_k.to(device=q.device, dtype=torch.int32)
    max_q, max_k = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        do.contiguous(), q.contiguous(), k_full, v_full, o.to(q.dtype).contiguous(), lse.contiguous(),
        cu_q, cu_k, max_q, max_k, 0.0, causal, rng_state, unused, scale=scale)
    dk = dk.view(-1, Hkv, group, d).float().sum(2)
    dv = dv.view(-1, Hkv, group, d).float().sum(2)
    return dq.float(), dk, dv


def _block_backward(*args):
    return (_block_backward_flash if _use_flash(args[1]) else _block_backward_reference)(*args)


def _merge(o_acc, lse_acc, rows, o_blk, lse_blk) -> None:
    """Fold a partial result (o_blk, lse_blk) of query rows `rows` into the fp32 accumulators, in place."""
    lse_old = lse_acc[:, rows]
    lse_new = torch.logaddexp(lse_old, lse_blk)
    ref = torch.where(torch.isfinite(lse_new), lse_new, 0.0)  # rows that still see nothing keep o = 0
    w_old = torch.exp(lse_old - ref).transpose(0, 1)[..., None]
    w_blk = torch.exp(lse_blk - ref).transpose(0, 1)[..., None]
    o_acc[rows] = o_acc[rows] * w_old + o_blk.float() * w_blk
    lse_acc[:, rows] = lse_new


# ---------------------------------------------------------------- ring plan and communication


def _cross_blocks(chunks: list[LocalChunk], src_rank: int, cp_size: int, chunk_len: int):
    """[(q_start, q_end, k_start, k_end)]: each local chunk's first document against its keys on `src_rank`.

    q rows are local offsets, k rows offsets into the visiting rank's local tensors.
    """
    C, blocks = chunk_len, []
    for c in chunks:
        if c.first_position == 0:
            continue
        doc_start = c.chunk * C - c.first_position  # within the window
        if doc_start < 0:
            raise ValueError("ring attention: positions must be global positions within the document "
                             f"(chunk {c.chunk} starts at position {c.first_position} > its window offset {c.chunk * C})")
        k_lo = k_hi = None
        for slot, kc in enumerate(zigzag_chunk_ids(src_rank, cp_size)):
            lo, hi = max(doc_start, kc * C), (kc + 1) * C
            if kc >= c.chunk or lo >= hi:
                continue
            shift = (2 * c.window + slot - kc) * C  # window offset -> visiting local offset
            if k_hi is not None and k_hi != lo + shift:
                raise AssertionError("ring attention: keys of one document are not contiguous on the visiting rank")
            k_lo = lo + shift if k_lo is None else k_lo
            k_hi = hi + shift
        if k_lo is not None:
            blocks.append((c.start, c.start + c.first_segment_len, k_lo, k_hi))
    return blocks


def _pack(blocks, device):
    """Row indices and cu_seqlens of a list of blocks, for one varlen call."""
    q_idx = torch.cat([torch.arange(a, b, device=device) for a, b, _, _ in blocks])
    k_idx = torch.cat([torch.arange(a, b, device=device) for _, _, a, b in blocks])
    q_len = torch.tensor([0] + [b - a for a, b, _, _ in blocks], device=device)
    k_len = torch.tensor([0] + [b - a for _, _, a, b in blocks], device=device)
    return q_idx, k_idx, q_len.cumsum(0).to(torch.int32), k_len.cumsum(0).to(torch.int32)


def _ring_shift_start(x, group, tag):
    """Send x to the next rank, receive the previous rank's x; returns (buffer, requests)."""
    P, r = group_size(group), group_rank(group)

    def peer(i):
        return i % P if group is None else dist.get_global_rank(group, i % P)

    recv = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), peer(r + 1), group, tag),
           dist.P2POp(dist.irecv, recv, peer(r - 1), group, tag)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for req in requests:
        req.wait()


# ---------------------------------------------------------------- the ring


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, chunks, chunk_len, group, scale):
        P, rank = group_size(group), group_rank(group)
        L, H, d = q.shape
        o_acc = torch.zeros(L, H, d, dtype=torch.float32, device=q.device)
        lse_acc = torch.full((H, L), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(P):
            if step < P - 1:
                kv_next, requests = _ring_shift_start(kv, group, _KV_TAG)
            if step == 0:  # own keys: causal within the local segments
                o_blk, lse_blk = _block_forward(q, k, v, cu_seqlens, cu_seqlens, True, scale)
                _merge(o_acc, lse_acc, slice(None), o_blk, lse_blk)
            blocks = _cross_blocks(chunks, (rank - step) % P, P, chunk_len)
            if blocks:
                q_idx, k_idx, cu_q, cu_k = _pack(blocks, q.device)
                o_blk, lse_blk = _block_forward(q[q_idx], kv[0][k_idx], kv[1][k_idx], cu_q, cu_k, False, scale)
                _merge(o_acc, lse_acc, q_idx, o_blk, lse_blk)
            if step < P - 1:
                _wait(requests)
                kv = kv_next
        o = o_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, cu_seqlens, o, lse_acc)
        ctx.chunks, ctx.chunk_len, ctx.group, ctx.scale = chunks, chunk_len, group, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, cu_seqlens, o, lse = ctx.saved_tensors
        chunks, chunk_len, group, scale = ctx.chunks, ctx.chunk_len, ctx.group, ctx.scale
        P, rank = group_size(group), group_rank(group)
        do = do.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv_in = dkv_requests = None
        for step in range(P):
            if step < P - 1:
                kv_next, kv_requests = _ring_shift_start(kv, group, _KV_TAG)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # this step's dK/dV of the visiting block
            if step == 0:
                dq_blk, dk_blk, dv_blk = _block_backward(do, q, k, v, o, lse, cu_seqlens, cu_seqlens, True, scale)
                dq += dq_blk
                dkv[0] += dk_blk
                dkv[1] += dv_blk
            blocks = _cross_blocks(chunks, (rank - step) % P, P, chunk_len)
            if blocks:
                q_idx, k_idx, cu_q, cu_k = _pack(blocks, q.device)
                dq_blk, dk_blk, dv_blk = _block_backward(do[q_idx], q[q_idx], kv[0][k_idx], kv[1][k_idx], o[q_idx],
                                                         lse[:, q_idx], cu_q, cu_k, False, scale)
                dq.index_add_(0, q_idx, dq_blk.float())
                dkv[0].index_add_(0, k_idx, dk_blk.float())
                dkv[1].index_add_(0, k_idx, dv_blk.float())
            if step > 0:  # the visiting block's dK/dV so far, from the ranks it visited before
                _wait(dkv_requests)
                dkv += dkv_in
            if P > 1:  # pass it on; after the last step this hop brings every block home
                dkv_in, dkv_requests = _ring_shift_start(dkv, group, _DKV_TAG)
            else:
                dkv_in = dkv
            if step < P - 1:
                _wait(kv_requests)
                kv = kv_next
        if P > 1:
            _wait(dkv_requests)
        return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype), None, None, None, None, None


def ring_attention(q, k, v, cu_seqlens, positions, chunk_len: int, group, scale: float | None = None):
    """Causal softmax attention within documents of this rank's zigzag tokens (equals the full-window result).

    q [L, H, d], k/v [L, Hkv, d] (GQA: H % Hkv == 0); cu_seqlens: local segments; positions: global
    position within document; chunk_len: C = window / (2 * CP). Returns o [L, H, d] in q.dtype.
    """
    chunks = describe_local_chunks(cu_seqlens, positions, chunk_len, group_rank(group), group_size(group))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, cu_seqlens, chunks, chunk_len, group, scale)

"""LASP+: lightning attention over the zigzag context-parallel layout (docs/architecture.md, 'Parallel layouts'; MiniMax-01 §3.2).

Per head, S_t = lambda S_{t-1} + k_t^T v_t and o_t = q_t S_t, reset at every document start. A rank
holds two chunks of each window. Per local chunk c:
  KV_L(c)  state of the tokens after the chunk's last document start, from zero (the final state of
           its last local segment when the kernel runs with zero initial states);
  A(c)     lambda^C, or 0 when a document starts in the chunk (also at its first token).
The true state at the end of chunk c is E_c = A(c) E_{c-1} + KV_L(c), so the state entering chunk c is
  S_c = E_{c-1} = sum_{j<c} (prod_{k=j+1..c-1} A(k)) KV_L(j)                     (prefix combine).
`mode="allgather"` (LASP+): ONE all-gather of (KV_L, A) over CP, then every rank combines the prefix
locally; backward: one all-gather of dS and the mirrored suffix combine dKV_L(j) = sum_{c>j} (prod A) dS_c.
`mode="ring"`: the original LASP, E_c handed from chunk owner to chunk owner by serial P2P (2*CP-2 hops).

S_c is the initial state of the chunk's first document (the one that started in an earlier chunk).
Instead of a second kernel call with `initial_state`, its contribution is added as LASP's inter-chunk
term: the kernel gives o_t = q_t (lambda^{j+1} S_0 + local) for token j of a document, so
o_t += lambda^{j+1} q_t S_c on the chunk's first segment, which is exactly feeding S_c as
`initial_state`. One kernel call per layer (zero initial states, `output_final_state` for KV_L).
Communication per layer: O(H d^2) per rank, independent of T.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.lightning_attention import lightning_attention
from parallel.collectives import all_gather, group_rank, group_size
from parallel.zigzag import LocalChunk, chunk_owner, describe_local_chunks

__all__ = ["LASP_MODES", "lasp_lightning_attention", "prefix_states"]

LASP_MODES = ("allgather", "ring")


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _sequence_index(cp_size: int, n_windows: int) -> torch.Tensor:
    """For gathered [CP, 2B, ...] rows flattened: the flat row of (window b, chunk c), as a [B, 2*CP] table."""
    table = torch.empty(n_windows, 2 * cp_size, dtype=torch.long)
    for b in range(n_windows):
        for c in range(2 * cp_size):
            rank, slot = chunk_owner(c, cp_size)
            table[b, c] = rank * 2 * n_windows + 2 * b + slot
    return table


def _own_index(chunks: list[LocalChunk], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(window, chunk) of this rank's local chunks, to pick them out of [B, 2*CP] tables."""
    return (torch.tensor([c.window for c in chunks], device=device),
            torch.tensor([c.chunk for c in chunks], device=device))


def _prefix_combine(kv, decay):
    """S_c = A_{c-1} S_{c-1} + KV_{c-1}, S_0 = 0, along dim 1 of kv [B, 2P, H, dk, dv], decay [B, 2P, H]."""
    states = [torch.zeros_like(kv[:, 0])]
    for c in range(1, kv.shape[1]):
        states.append(decay[:, c - 1, :, None, None] * states[-1] + kv[:, c - 1])
    return torch.stack(states, dim=1)


def _suffix_combine(d_states, decay):
    """Adjoint of _prefix_combine: G_j = dS_{j+1} + A_{j+1} G_{j+1}, G_{2P-1} = 0 (G_j = dLoss/dKV_j)."""
    n = d_states.shape[1]
    grads = [torch.zeros_like(d_states[:, 0])]
    for j in range(n - 2, -1, -1):
        grads.append(d_states[:, j + 1] + decay[:, j + 1, :, None, None] * grads[-1])
    return torch.stack(grads[::-1], dim=1)


class _PrefixStatesAllGather(torch.autograd.Function):
    """kv_last [2B, H, dk, dv], decay [2B, H] (no grad) -> prefix states of the local chunks [2B, H, dk, dv]."""

    @staticmethod
    def forward(ctx, kv_last, decay, chunks, group):
        P, nl = group_size(group), kv_last.shape[0]
        n_windows = nl // 2
        # One all-gather of (KV_L, A) packed into a single buffer.
        packed = torch.cat([kv_last.reshape(nl, -1), decay.to(kv_last.dtype)], dim=1)
        gathered = all_gather(packed, group).view(P * nl, -1)
        seq = _sequence_index(P, n_windows).to(kv_last.device)
        kv = gathered[seq, : kv_last[0].numel()].view(n_windows, 2 * P, *kv_last.shape[1:])
        seq_decay = gathered[seq, kv_last[0].numel():]
        windows, chunk_ids = _own_index(chunks, kv_last.device)
        ctx.save_for_backward(seq_decay)
        ctx.group, ctx.chunks = group, chunks
        return _prefix_combine(kv, seq_decay)[windows, chunk_ids]

    @staticmethod
    def backward(ctx, d_prefix):
        (seq_decay,) = ctx.saved_tensors
        group, chunks = ctx.group, ctx.chunks
        P, nl = group_size(group), d_prefix.shape[0]
        gathered = all_gather(d_prefix.contiguous(), group)  # the one backward all-gather, of dS
        seq = _sequence_index(P, nl // 2).to(d_prefix.device)
        d_seq = gathered[seq]  # [B, 2P, H, dk, dv]
        windows, chunk_ids = _own_index(chunks, d_prefix.device)
        return _suffix_combine(d_seq, seq_decay)[windows, chunk_ids], None, None, None


class _PrefixStatesRing(torch.autograd.Function):
    """The original LASP: E_c travels chunk owner -> chunk owner in sequence order, one P2P hop at a time."""

    @staticmethod
    def forward(ctx, kv_last, decay, chunks, group):
        P, rank = group_size(group), group_rank(group)
        n_windows = kv_last.shape[0] // 2
        first, second = kv_last.view(n_windows, 2, *kv_last.shape[1:]).unbind(1)  # chunks r and 2P-1-r
        a_first, a_second = decay.view(n_windows, 2, -1).unbind(1)
        # chunk r: state from rank r-1 (chunk r-1), none for chunk 0
        s_first = torch.zeros_like(first)
        if rank > 0:
            dist.recv(s_first, _global_rank(group, rank - 1), group=group)
        e_first = a_first[..., None, None] * s_first + first
        if rank < P - 1:
            dist.send(e_first, _global_rank(group, rank + 1), group=group)
        # chunk 2P-1-r: state from chunk 2P-2-r, on rank r+1 (or this rank's own chunk r when r = P-1)
        if rank < P - 1:
            s_second = torch.empty_like(second)
            dist.recv(s_second, _global_rank(group, rank + 1), group=group)
        else:
            s_second = e_first
        if rank > 0:
            dist.send(a_second[..., None, None] * s_second + second, _global_rank(group, rank - 1), group=group)
        ctx.save_for_backward(a_first, a_second)
        ctx.group = group
        return torch.stack([s_first, s_second], dim=1).view_as(kv_last)

    @staticmethod
    def backward(ctx, d_prefix):
        a_first, a_second = ctx.saved_tensors
        group = ctx.group
        P, rank = group_size(group), group_rank(group)
        d_first, d_second = d_prefix.contiguous().view(a_first.shape[0], 2, *d_prefix.shape[1:]).unbind(1)
        # Reverse order. gE of chunk 2P-1-r comes from the owner of chunk 2P-r (rank r-1); 0 for the last chunk.
        g_second = torch.zeros_like(d_second)
        if rank > 0:
            dist.recv(g_second, _global_rank(group, rank - 1), group=group)
        g_before_second = d_second + a_second[..., None, None] * g_second  # gE of chunk 2P-2-r
        if rank < P - 1:
            dist.send(g_before_second, _global_rank(group, rank + 1), group=group)
            g_first = torch.empty_like(d_first)
            dist.recv(g_first, _global_rank(group, rank + 1), group=group)
        else:
            g_first = g_before_second
        if rank > 0:
            dist.send(d_first + a_first[..., None, None] * g_first, _global_rank(group, rank - 1), group=group)
        return torch.stack([g_first, g_second], dim=1).view_as(d_prefix), None, None, None


def prefix_states(kv_last, decay, chunks: list[LocalChunk], group, mode: str = "allgather"):
    """State entering each local chunk from all earlier chunks of its window (module docstring)."""
    if mode not in LASP_MODES:
        raise ValueError(f"lasp.mode={mode!r} must be one of {'|'.join(LASP_MODES)}")
    fn = _PrefixStatesAllGather if mode == "allgather" else _PrefixStatesRing
    if group_size(group) == 1:  # still one window's two chunks in sequence order: combine locally
        fn = _PrefixStatesAllGather
    return fn.apply(kv_last, decay.detach(), chunks, group)


def lasp_lightning_attention(q, k, v, slope, cu_seqlens, positions, chunk_len: int, group, mode: str = "allgather",
                             block_size: int = 64):
    """Lightning attention of this rank's zigzag tokens; equals the single-process result on the full window.

    q, k, v [L, H, d] local tokens; cu_seqlens: local segments; positions: global position within document;
    chunk_len: C = window / (2 * CP). Returns o [L, H, d_v].
    """
    P, rank = group_size(group), group_rank(group)
    chunks = describe_local_chunks(cu_seqlens, positions, chunk_len, rank, P)
    o, final = lightning_attention(q, k, v, slope, cu_seqlens=cu_seqlens, output_final_state=True,
                                   block_size=block_size)
    s = slope.to(device=q.device, dtype=torch.float32)
    kv_last = final[torch.tensor([c.last_segment for c in chunks], device=q.device)]
    decay = torch.stack([torch.zeros_like(s) if c.has_document_start else torch.exp(-s * chunk_len)
                         for c in chunks])
    states = prefix_states(kv_last, decay, chunks, group, mode)

    # Inter-chunk term on each chunk's first segment when it continues a document from earlier chunks.
    pieces, last = [], 0
    for c, state in zip(chunks, states.unbind(0)):
        if c.first_position == 0:
            continue
        n = c.first_segment_len
        j = torch.arange(1, n + 1, device=q.device, dtype=torch.float32)
        q_decayed = q[c.start: c.start + n] * torch.exp(-s[None, :] * j[:, None]).to(q.dtype)[..., None]
        inter = torch.einsum("thk,hkv->thv", q_decayed, state.to(q.dtype))
        pieces += [o[last: c.start], o[c.start: c.start + n] + inter]
        last = c.start + n
    if not pieces:
        # Every rank must run the backward of the prefix exchange (it holds a collective), even when no local
        # chunk continues a document: keep the states in the graph with a zero contribution.
        return o + 0.0 * states.sum().to(o.dtype)
    return torch.cat(pieces + [o[last:]])

"""Triton backward kernels of lightning attention, mirroring kernels/lightning_triton_fwd.py.

Per segment g = [a, b) with the forward's saved entering state S_g (per chunk of L tokens,
positions j, S the state entering the chunk, dS the gradient of the state leaving it):

    dq_j = sum_{i<=j} lambda^(j-i) (do_j . v_i) k_i + lambda^(j+1) do_j S^T
    dk_i = sum_{j>=i} lambda^(j-i) (do_j . v_i) q_j + lambda^(L-1-i) v_i dS^T
    dv_i = sum_{j>=i} lambda^(j-i) (q_j . k_i) do_j + lambda^(L-1-i) k_i dS
    dS_entering = lambda^L dS + (Q * lambda^(j+1))^T dO

1. `_bwd_dq_kernel` walks each segment forwards from S_g (one program per block of d_k
   columns), writes dq and the segment's local dS term sum_t lambda^(t-a+1) q_t^T do_t.
2. the forward's `_segment_scan_kernel`, reversed, turns the local terms into dS leaving
   each segment (from d final_state) and gives d initial_state.
3. `_bwd_dkdv_kernel` walks each segment backwards from its dS; programs
   [0, DV/BV) own a block of dv columns (with dS[:, block]), the rest a block of dk
   columns (with dS[block, :]), so no program holds the whole d x d gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.lightning_triton_fwd import mm, rnd, tuned


@tuned
@triton.jit
def _bwd_dq_kernel(
    q, k, v, do, dq, slope, seg_bounds, states, dstates,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    NK: tl.constexpr = DK // BK
    pid = tl.program_id(0)
    i_h = tl.program_id(1)
    i_g = pid // NK
    i_k = pid % NK
    DTYPE: tl.constexpr = q.dtype.element_ty
    start = tl.load(seg_bounds + 2 * i_g)
    end = tl.load(seg_bounds + 2 * i_g + 1)
    s = tl.load(slope + i_h)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, DV)
    p_state = ((i_g.to(tl.int64) * H + i_h) * DK + o_k[:, None]) * DV + o_v[None, :]
    b_s = tl.load(states + p_state)  # [BK, DV]: rows of the state entering the segment
    b_dsl = tl.zeros([BK, DV], dtype=tl.float32)
    q_decay = tl.exp(-s * (o_t + 1).to(tl.float32))
    gap = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    d_intra = tl.where(o_t[:, None] >= o_t[None, :], tl.exp(-s * gap), 0.0)  # [j, i]

    for t0 in range(start, end, BT):
        rows = t0 + o_t
        m_t = rows < end
        n_valid = tl.minimum(end - t0, BT)
        r64 = rows.to(tl.int64) * H + i_h
        b_do = tl.load(do + r64[:, None] * DV + o_v[None, :], mask=m_t[:, None], other=0.0)
        b_v = tl.load(v + r64[:, None] * DV + o_v[None, :], mask=m_t[:, None], other=0.0)
        b_k = tl.load(k + r64[:, None] * DK + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_q = tl.load(q + r64[:, None] * DK + o_k[None, :], mask=m_t[:, None], other=0.0)

        b_a = mm(b_do, tl.trans(b_v), tl.zeros([BT, BT], dtype=tl.float32), DTYPE, PREC, UPCAST)
        b_a = b_a * d_intra
        b_dq = mm(b_do, tl.trans(b_s), tl.zeros([BT, BK], dtype=tl.float32), DTYPE, PREC, UPCAST)
        b_dq = b_dq * q_decay[:, None]
        b_dq = mm(b_a, b_k, b_dq, DTYPE, PREC, UPCAST)
        tl.store(dq + r64[:, None] * DK + o_k[None, :], rnd(b_dq, DTYPE, UPCAST).to(dq.dtype.element_ty), mask=m_t[:, None])

        k_decay = tl.where(m_t, tl.exp(-s * (n_valid - 1 - o_t).to(tl.float32)), 0.0)
        b_s = b_s * tl.exp(-s * n_valid.to(tl.float32))
        b_s = mm(tl.trans(b_k * k_decay[:, None]), b_v, b_s, DTYPE, PREC, UPCAST)
        seg_decay = tl.where(m_t, tl.exp(-s * (rows - start + 1).to(tl.float32)), 0.0)
        b_dsl = mm(tl.trans(b_q * seg_decay[:, None]), b_do, b_dsl, DTYPE, PREC, UPCAST)
    tl.store(dstates + p_state, b_dsl)


@triton.jit
def _dv_block(
    q, k, do, dv, s, start, end, dstates, i_h, i_v, p_seg,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dv[:, block] of one segment, walking its chunks backwards with dS[:, block]."""
    DTYPE: tl.constexpr = q.dtype.element_ty
    n_chunks = tl.cdiv(end - start, BT)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, DK)
    o_v = i_v * BV + tl.arange(0, BV)
    q_decay_all = tl.exp(-s * (o_t + 1).to(tl.float32))
    gap = (o_t[None, :] - o_t[:, None]).to(tl.float32)
    d_intra_t = tl.where(o_t[None, :] >= o_t[:, None], tl.exp(-s * gap), 0.0)  # [i, j]
    b_ds = tl.load(dstates + p_seg + o_k[:, None] * DV + o_v[None, :])  # [DK, BV]
    for i in range(n_chunks):
        t0 = start + (n_chunks - 1 - i) * BT
        rows = t0 + o_t
        m_t = rows < end
        n_valid = tl.minimum(end - t0, BT)
        r64 = rows.to(tl.int64) * H + i_h
        b_q = tl.load(q + r64[:, None] * DK + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_k = tl.load(k + r64[:, None] * DK + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_do = tl.load(do + r64[:, None] * DV + o_v[None, :], mask=m_t[:, None], other=0.0)
        k_decay = tl.where(m_t, tl.exp(-s * (n_valid - 1 - o_t).to(tl.float32)), 0.0)

        b_at = mm(b_k, tl.trans(b_q), tl.zeros([BT, BT], dtype=tl.float32), DTYPE, PREC, UPCAST)
        b_at = b_at * d_intra_t
        b_dv = mm(b_k, b_ds, tl.zeros([BT, BV], dtype=tl.float32), DTYPE, PREC, UPCAST)
        b_dv = b_dv * k_decay[:, None]
        b_dv = mm(b_at, b_do, b_dv, DTYPE, PREC, UPCAST)
        tl.store(dv + r64[:, None] * DV + o_v[None, :], rnd(b_dv, DTYPE, UPCAST).to(dv.dtype.element_ty), mask=m_t[:, None])

        q_decay = tl.where(m_t, q_decay_all, 0.0)
        b_ds = b_ds * tl.exp(-s * n_valid.to(tl.float32))
        b_ds = mm(tl.trans(b_q), b_do * q_decay[:, None], b_ds, DTYPE, PREC, UPCAST)


@triton.jit
def _dk_block(
    q, v, do, dk, s, start, end, dstates, i_h, i_k, p_seg,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dk[:, block] of one segment, walking its chunks backwards with dS[block, :]."""
    DTYPE: tl.constexpr = q.dtype.element_ty
    n_chunks = tl.cdiv(end - start, BT)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, DV)
    q_decay_all = tl.exp(-s * (o_t + 1).to(tl.float32))
    gap = (o_t[None, :] - o_t[:, None]).to(tl.float32)
    d_intra_t = tl.where(o_t[None, :] >= o_t[:, None], tl.exp(-s * gap), 0.0)  # [i, j]
    b_ds = tl.load(dstates + p_seg + o_k[:, None] * DV + o_v[None, :])  # [BK, DV]
    for i in range(n_chunks):
        t0 = start + (n_chunks - 1 - i) * BT
        rows = t0 + o_t
        m_t = rows < end
        n_valid = tl.minimum(end - t0, BT)
        r64 = rows.to(tl.int64) * H + i_h
        b_q = tl.load(q + r64[:, None] * DK + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_v = tl.load(v + r64[:, None] * DV + o_v[None, :], mask=m_t[:, None], other=0.0)
        b_do = tl.load(do + r64[:, None] * DV + o_v[None, :], mask=m_t[:, None], other=0.0)
        k_decay = tl.where(m_t, tl.exp(-s * (n_valid - 1 - o_t).to(tl.float32)), 0.0)

        b_bt = mm(b_v, tl.trans(b_do), tl.zeros([BT, BT], dtype=tl.float32), DTYPE, PREC, UPCAST)
        b_bt = b_bt * d_intra_t
        b_dk = mm(b_v, tl.trans(b_ds), tl.zeros([BT, BK], dtype=tl.float32), DTYPE, PREC, UPCAST)
        b_dk = b_dk * k_decay[:, None]
        b_dk = mm(b_bt, b_q, b_dk, DTYPE, PREC, UPCAST)
        tl.store(dk + r64[:, None] * DK + o_k[None, :], rnd(b_dk, DTYPE, UPCAST).to(dk.dtype.element_ty), mask=m_t[:, None])

        q_decay = tl.where(m_t, q_decay_all, 0.0)
        b_ds = b_ds * tl.exp(-s * n_valid.to(tl.float32))
        b_ds = mm(tl.trans(b_q * q_decay[:, None]), b_do, b_ds, DTYPE, PREC, UPCAST)


@tuned
@triton.jit
def _bwd_dkdv_kernel(
    q, k, v, do, dk, dv, slope, seg_bounds, dstates,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    NV: tl.constexpr = DV // BV
    NB: tl.constexpr = NV + DK // BK
    pid = tl.program_id(0)
    i_h = tl.program_id(1)
    i_g = pid // NB
    i_b = pid % NB
    start = tl.load(seg_bounds + 2 * i_g)
    end = tl.load(seg_bounds + 2 * i_g + 1)
    s = tl.load(slope + i_h)
    p_seg = (i_g.to(tl.int64) * H + i_h) * DK * DV
    if i_b < NV:
        _dv_block(q, k, do, dv, s, start, end, dstates, i_h, i_b, p_seg, H, DK, DV, BT, BV, PREC, UPCAST)
    else:
        _dk_block(q, v, do, dk, s, start, end, dstates, i_h, i_b - NV, p_seg, H, DK, DV, BT, BK, PREC, UPCAST)


def bwd_dq(q, k, v, do, slope, seg_bounds, states, n_segs, cfg):
    """dq and each segment's local dS term, [n_segs, H, DK, DV] fp32."""
    _, H, DK = q.shape
    DV = v.shape[2]
    dq = q.new_empty(q.shape)
    dstates = states.new_empty(states.shape)
    BK = min(DK, cfg.dq_block)
    grid = (n_segs * (DK // BK), H)
    _bwd_dq_kernel[grid](
        q, k, v, do, dq, slope, seg_bounds, states, dstates, H=H, DK=DK, DV=DV, BT=cfg.chunk, BK=BK,
        PREC=cfg.prec, UPCAST=cfg.upcast,
    )
    return dq, dstates


def bwd_dkdv(q, k, v, do, slope, seg_bounds, dstates, n_segs, cfg):
    _, H, DK = q.shape
    DV = v.shape[2]
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    BK, BV = min(DK, cfg.dkdv_block), min(DV, cfg.dkdv_block)
    grid = (n_segs * (DK // BK + DV // BV), H)
    _bwd_dkdv_kernel[grid](
        q, k, v, do, dk, dv, slope, seg_bounds, dstates, H=H, DK=DK, DV=DV, BT=cfg.chunk, BK=BK, BV=BV,
        PREC=cfg.prec, UPCAST=cfg.upcast,
    )
    return dk, dv

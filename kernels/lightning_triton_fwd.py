"""Triton forward kernels of lightning attention (docs/architecture.md, 'The model'), segment-parallel form.

The packed sequence is cut into segments of a few hundred to a few thousand tokens that never
cross a document boundary (see kernels/lightning_triton.py). Per head h (s = slope_h,
lambda = exp(-s)) and segment g = [a, b):

1. `_segment_kv_kernel`:  KV_g = sum_{t in g} lambda^(b-1-t) k_t^T v_t        (one blocked matmul)
2. `_segment_scan_kernel`: S_g  = state entering segment g, walking each document's segments
   in order from its initial state (or zero); writes S_g over KV_g and the final state.
   Run in reverse it is also the backward's scan of dS.
3. `_fwd_output_kernel`: walks the segment's chunks of BT tokens from S_g, keeping the state
   in registers (fp32):  O = [(Q K^T) * D] V + (Q * lambda^(j+1)) S,
   S <- lambda^L S + (K * lambda^(L-1-j))^T V.

Only the per-segment states touch memory (fp32, [n_segments, H, d_k, d_v]), not one state per
chunk as in flash-linear-attention's chunk form, so the forward moves q, k, v, o and k, v once
more. All products accumulate in fp32; dot operands are in the input dtype (the state is
rounded to it for Q S, as fla does).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (num_warps, num_stages) tried by the autotuner on the GPU for 16-bit inputs. fp32 inputs (a
# correctness path, not a fast one: tf32x3 products, spilling registers) use FP32_CONFIG only.
TUNE_SPACE = [(4, 2), (8, 2), (4, 3), (8, 1)]
FP32_CONFIG = (8, 1)


def _prune_for_fp32(configs, named_args, **kwargs):
    first = next(iter(named_args.values()))
    if first.element_size() == 4:
        return [triton.Config({}, num_warps=FP32_CONFIG[0], num_stages=FP32_CONFIG[1])]
    return configs


def tuned(fn):
    """Autotune num_warps/num_stages on the GPU; plain kernel under the interpreter."""
    if INTERPRET:
        return fn
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in TUNE_SPACE]
    return triton.autotune(
        configs=configs,
        key=["DK", "DV", "BT"],
        prune_configs_by={"early_config_prune": _prune_for_fp32},
    )(fn)


@triton.jit
def rnd(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to the input dtype. UPCAST (interpreter, bf16): the interpreter truncates on
    fp32 -> bf16 casts and multiplies bf16 as raw integers, so there round-to-nearest-even is
    done by hand and the value stays in fp32 (exactly representable in bf16)."""
    if UPCAST:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def mm(a, b, acc, DTYPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with operands rounded to the input dtype; fp32 accumulate."""
    return tl.dot(rnd(a, DTYPE, UPCAST), rnd(b, DTYPE, UPCAST), acc, input_precision=PREC)


@tuned
@triton.jit
def _segment_kv_kernel(
    k, v, slope, seg_bounds, kv,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    NB: tl.constexpr = (DK // BK) * (DV // BV)
    pid = tl.program_id(0)
    i_h = tl.program_id(1)
    i_g = pid // NB
    i_k = (pid % NB) // (DV // BV)
    i_v = pid % (DV // BV)
    DTYPE: tl.constexpr = k.dtype.element_ty
    start = tl.load(seg_bounds + 2 * i_g)
    end = tl.load(seg_bounds + 2 * i_g + 1)
    s = tl.load(slope + i_h)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for t0 in range(start, end, BT):
        rows = t0 + o_t
        m_t = rows < end
        r64 = rows.to(tl.int64) * H + i_h
        b_k = tl.load(k + r64[:, None] * DK + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_v = tl.load(v + r64[:, None] * DV + o_v[None, :], mask=m_t[:, None], other=0.0)
        w = tl.where(m_t, tl.exp(-s * (end - 1 - rows).to(tl.float32)), 0.0)
        acc = mm(tl.trans(b_k), b_v * w[:, None], acc, DTYPE, PREC, UPCAST)
    p_kv = kv + ((i_g.to(tl.int64) * H + i_h) * DK + o_k[:, None]) * DV + o_v[None, :]
    tl.store(p_kv, acc)


@triton.jit
def _segment_scan_kernel(
    buf, slope, seg_bounds, doc_segs, s_in, s_out, n_segs,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_IN: tl.constexpr, HAS_OUT: tl.constexpr, REVERSE: tl.constexpr,
):
    """Per document, replace each segment's local term X_g by the carry entering it.

    forward:  carry_0 = s_in (initial state), carry_{g+1} = lambda^len_g carry_g + X_g
    REVERSE:  same from the last segment backwards (X_g = local dS, s_in = d final state,
              s_out = d initial state). s_out receives the carry after the last step.
    """
    NB: tl.constexpr = (DK // BK) * (DV // BV)
    pid = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = pid // NB
    i_k = (pid % NB) // (DV // BV)
    i_v = pid % (DV // BV)
    lo = tl.load(doc_segs + i_n)
    hi = tl.load(doc_segs + i_n + 1)
    n = hi - lo
    s = tl.load(slope + i_h)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    tile = o_k[:, None] * DV + o_v[None, :]
    p_doc = (i_n.to(tl.int64) * H + i_h) * DK * DV + tile
    if HAS_IN:
        carry = tl.load(s_in + p_doc).to(tl.float32)
    else:
        carry = tl.zeros([BK, BV], dtype=tl.float32)
    # The loop is latency-bound: the next segment's term and length are loaded before the
    # current carry is stored, so that load overlaps the store and the update.
    # Indices are clamped into [0, n_segs) so prefetches past a document's end stay in bounds
    # (their values are never used).
    step = -1 if REVERSE else 1
    g = tl.minimum(hi - 1 if REVERSE else lo, n_segs - 1)
    local = tl.load(buf + (g.to(tl.int64) * H + i_h) * DK * DV + tile)
    length = tl.load(seg_bounds + 2 * g + 1) - tl.load(seg_bounds + 2 * g)
    for i in range(n):
        g_next = tl.minimum(tl.maximum(g + step, 0), n_segs - 1)
        local_next = tl.load(buf + (g_next.to(tl.int64) * H + i_h) * DK * DV + tile)
        length_next = tl.load(seg_bounds + 2 * g_next + 1) - tl.load(seg_bounds + 2 * g_next)
        tl.store(buf + (g.to(tl.int64) * H + i_h) * DK * DV + tile, carry)
        carry = carry * tl.exp(-s * length.to(tl.float32)) + local
        g = g_next
        local = local_next
        length = length_next
    if HAS_OUT:
        tl.store(s_out + p_doc, carry)


@tuned
@triton.jit
def _fwd_output_kernel(
    q, k, v, o, slope, seg_bounds, states,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    NV: tl.constexpr = DV // BV
    pid = tl.program_id(0)
    i_h = tl.program_id(1)
    i_g = pid // NV
    i_v = pid % NV
    DTYPE: tl.constexpr = q.dtype.element_ty
    start = tl.load(seg_bounds + 2 * i_g)
    end = tl.load(seg_bounds + 2 * i_g + 1)
    s = tl.load(slope + i_h)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, DK)
    o_v = i_v * BV + tl.arange(0, BV)
    p_s = states + ((i_g.to(tl.int64) * H + i_h) * DK + o_k[:, None]) * DV + o_v[None, :]
    b_s = tl.load(p_s)  # [DK, BV] fp32: the state entering the segment
    for t0 in range(start, end, BT):
        q_decay = tl.exp(-s * (o_t + 1).to(tl.float32))  # lambda^(j+1)
        gap = (o_t[:, None] - o_t[None, :]).to(tl.float32)
        d_intra = tl.where(o_t[:, None] >= o_t[None, :], tl.exp(-s * gap), 0.0)  # [j, i]
        rows = t0 + o_t
        m_t = rows < end
        n_valid = tl.minimum(end - t0, BT)
        r64 = rows.to(tl.int64) * H + i_h
        b_q = tl.load(q + r64[:, None] * DK + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_k = tl.load(k + r64[:, None] * DK + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_v = tl.load(v + r64[:, None] * DV + o_v[None, :], mask=m_t[:, None], other=0.0)

        # Decays scale rows of products (or the narrower operand), never a [BT, DK] fp32 tile.
        b_a = mm(b_q, tl.trans(b_k), tl.zeros([BT, BT], dtype=tl.float32), DTYPE, PREC, UPCAST)
        b_a = b_a * d_intra
        b_o = mm(b_q, b_s, tl.zeros([BT, BV], dtype=tl.float32), DTYPE, PREC, UPCAST)
        b_o = b_o * q_decay[:, None]
        b_o = mm(b_a, b_v, b_o, DTYPE, PREC, UPCAST)
        tl.store(o + r64[:, None] * DV + o_v[None, :], rnd(b_o, DTYPE, UPCAST).to(o.dtype.element_ty), mask=m_t[:, None])

        k_decay = tl.where(m_t, tl.exp(-s * (n_valid - 1 - o_t).to(tl.float32)), 0.0)
        b_s = b_s * tl.exp(-s * n_valid.to(tl.float32))
        b_s = mm(tl.trans(b_k), b_v * k_decay[:, None], b_s, DTYPE, PREC, UPCAST)


def segment_kv(k, v, slope, seg_bounds, n_segs, cfg):
    """Local state of every segment, [n_segs, H, DK, DV] fp32."""
    _, H, DK = k.shape
    DV = v.shape[2]
    kv = k.new_empty(n_segs, H, DK, DV, dtype=torch.float32)
    BK, BV = min(DK, cfg.kv_block), min(DV, cfg.kv_block)
    grid = (n_segs * (DK // BK) * (DV // BV), H)
    _segment_kv_kernel[grid](
        k, v, slope, seg_bounds, kv, H=H, DK=DK, DV=DV, BT=cfg.chunk, BK=BK, BV=BV,
        PREC=cfg.prec, UPCAST=cfg.upcast,
    )
    return kv


def segment_scan(buf, slope, seg_bounds, doc_segs, n_docs, s_in, s_out, reverse):
    """In place: buf[g] <- carry entering segment g (reverse: leaving it); s_out <- last carry."""
    n_segs, H, DK, DV = buf.shape
    BK, BV = min(DK, 32), min(DV, 32)
    grid = (n_docs * (DK // BK) * (DV // BV), H)
    _segment_scan_kernel[grid](
        buf, slope, seg_bounds, doc_segs,
        s_in if s_in is not None else buf, s_out if s_out is not None else buf, n_segs,
        H=H, DK=DK, DV=DV, BK=BK, BV=BV,
        HAS_IN=s_in is not None, HAS_OUT=s_out is not None, REVERSE=reverse,
        num_warps=2,
    )


def fwd_output(q, k, v, slope, seg_bounds, states, n_segs, cfg):
    T, H, DK = q.shape
    DV = v.shape[2]
    o = v.new_empty(T, H, DV)
    BV = min(DV, cfg.out_block)
    grid = (n_segs * (DV // BV), H)
    _fwd_output_kernel[grid](
        q, k, v, o, slope, seg_bounds, states, H=H, DK=DK, DV=DV, BT=cfg.chunk, BV=BV,
        PREC=cfg.prec, UPCAST=cfg.upcast,
    )
    return o

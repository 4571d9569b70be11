"""Varlen softmax attention core with log-sum-exp, for packed documents and GQA.

q [Tq, H, d], k/v [Tk, Hkv, d] with H % Hkv == 0 (query head h reads kv head h // (H/Hkv)).
Documents never attend to each other. With `causal`, the END of each query segment is
aligned with the end of its key segment (flash-attn's bottom-right alignment): query i of
a segment with Lq queries and Lk keys sees keys 0 .. i + Lk - Lq. With equal cu_seqlens for
q and k this is plain causal attention within each document; with different ones it is
what ring attention needs when a q chunk meets a k chunk.

Returns (o [Tq, H, d] in q.dtype, lse [H, Tq]); lse is the natural-log sum of the scaled
scores a query sees, fp32 (fp64 for fp64 inputs in the reference). A query that sees no key
gets o = 0 and lse = -inf, so merging partial results by LSE gives it zero weight.

GPU path: torch.nn.attention.varlen.varlen_attn (bf16/fp16 only); everything else, and any
torch without varlen_attn, uses the PyTorch reference.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import warnings

import torch

from kernels.cu_seqlens import checked_cu_seqlens

__all__ = ["softmax_attention_varlen", "softmax_attention_varlen_reference"]


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point [T, heads, d] tensor, got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k head dim {k.shape[2]} must equal q head dim {q.shape[2]}")
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    cu_q = checked_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = checked_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got {len(cu_q)} and {len(cu_k)}"
        )
    return cu_q, cu_k


def softmax_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k=None, scale=None, causal=True):
    """Loop over documents, compute in fp32 (or fp64), differentiable by autograd."""
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    cu_q, cu_k = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    H, d = q.shape[1], q.shape[2]
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    ct = torch.promote_types(q.dtype, torch.float32)

    outputs, lses = [], []
    for qs, qe, ks, ke in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        Lq, Lk = qe - qs, ke - ks
        if Lk == 0:  # nothing to attend to
            outputs.append(q.new_zeros(Lq, H, d, dtype=ct))
            lses.append(q.new_full((H, Lq), float("-inf"), dtype=ct))
            continue
        q_doc = q[qs:qe].to(ct)
        k_doc = k[ks:ke].to(ct).repeat_interleave(group, dim=1)  # GQA: expand kv heads
        v_doc = v[ks:ke].to(ct).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_doc, k_doc) * scale  # [H, Lq, Lk]
        if causal:
            q_pos = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)  # bottom-right alignment
            visible = torch.arange(Lk, device=q.device)[None, :] <= q_pos
            scores = scores.masked_fill(~visible, float("-inf"))
        # Stable softmax that stays finite (values and gradients) on rows that see no key.
        row_max = scores.amax(dim=-1, keepdim=True).detach()
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        weights = torch.exp(scores - row_max)
        total = weights.sum(dim=-1, keepdim=True)
        sees_any = total > 0
        total = torch.where(sees_any, total, 1.0)
        outputs.append(torch.einsum("hqk,khd->qhd", weights / total, v_doc))
        lse = torch.where(sees_any, row_max + torch.log(total), float("-inf"))
        lses.append(lse.squeeze(-1))
    return torch.cat(outputs).to(q.dtype), torch.cat(lses, dim=1)


@functools.lru_cache(maxsize=1)
def _varlen_attn_api():
    """(varlen_attn, AuxRequest, parameter names), or None when this torch has no varlen_attn."""
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except ImportError:
        warnings.warn(
            "torch.nn.attention.varlen is unavailable; softmax attention uses the PyTorch reference"
        )
        return None
    return varlen_attn, AuxRequest, frozenset(inspect.signature(varlen_attn).parameters)


def _softmax_attention_varlen_cuda(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    """varlen_attn adapter: newer torch has window_size/enable_gqa, older ones is_causal only."""
    varlen_attn, AuxRequest, params = _varlen_attn_api()
    H, Hkv = q.shape[1], k.shape[1]
    kwargs = {"return_aux": AuxRequest(lse=True), "scale": scale}
    if H != Hkv:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # expand kv heads; head h reads kv head h // (H/Hkv), as in the reference
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    cu_q = cu_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_k.to(device=q.device, dtype=torch.int32)
    o, lse = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    if lse.shape != (H, q.shape[0]) and lse.shape == (q.shape[0], H):  # documented as [T, H] in some versions
        lse = lse.transpose(0, 1)
    # flash-attn reports +inf for rows that see no key; -inf is the true empty log-sum-exp.
    lse = torch.where(lse == float("inf"), float("-inf"), lse.float())
    return o, lse


def softmax_attention_varlen(q, k, v, cu_seqlens, scale=None, causal=True, cu_seqlens_k=None):
    """Varlen softmax attention -> (o [Tq, H, d], lse [H, Tq]). cu_seqlens_k defaults to cu_seqlens."""
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens
    use_gpu_kernel = (
        q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _varlen_attn_api() is not None
    )
    if not use_gpu_kernel:
        return softmax_attention_varlen_reference(q, k, v, cu_seqlens, cu_seqlens_k, scale, causal)
    cu_q, cu_k = _check_inputs(q, k, v, cu_seqlens, cu_seqlens_k)
    max_q = max(b - a for a, b in itertools.pairwise(cu_q))  # from the host list: no device sync
    max_k = max(b - a for a, b in itertools.pairwise(cu_k))
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    return _softmax_attention_varlen_cuda(q, k, v, cu_seqlens, cu_seqlens_k, max_q, max_k, scale, causal)

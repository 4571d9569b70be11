"""Varlen softmax attention: per-document SDPA parity (output, LSE, gradients), bottom-right causal
and non-causal masks with different q/k lengths, empty rows, validation, and the GPU path."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cu_from_lengths

from kernels.softmax_attention import softmax_attention_varlen, softmax_attention_varlen_reference

F64 = torch.float64


def random_qkv(gen, Tq, Tk, H=4, Hkv=2, d=8, dtype=F64):
    q = torch.randn(Tq, H, d, generator=gen, dtype=F64).to(dtype)
    k = torch.randn(Tk, Hkv, d, generator=gen, dtype=F64).to(dtype)
    v = torch.randn(Tk, Hkv, d, generator=gen, dtype=F64).to(dtype)
    return q, k, v


def random_lengths(gen, n, lo, hi):
    return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()


def assert_close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def test_matches_sdpa_per_document(gen):
    lengths = [1, *random_lengths(gen, 3, 1, 12), 1]
    cu = cu_from_lengths(lengths)
    q, k, v = random_qkv(gen, sum(lengths), sum(lengths))
    inputs = [x.requires_grad_() for x in (q, k, v)]
    grad_o = torch.randn(q.shape, generator=gen, dtype=F64)
    scale = 1 / math.sqrt(q.shape[2])

    o, lse = softmax_attention_varlen(q, k, v, cu)
    assert o.shape == q.shape and lse.shape == (4, sum(lengths))
    grads = torch.autograd.grad((o * grad_o).sum(), inputs)

    o_docs, lse_docs = [], []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        # [L, heads, d] -> [heads, L, d]; GQA by expanding kv heads (head h reads kv head h // 2)
        qd = q[start:end].transpose(0, 1)
        kd = k[start:end].repeat_interleave(2, dim=1).transpose(0, 1)
        vd = v[start:end].repeat_interleave(2, dim=1).transpose(0, 1)
        o_docs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(0, 1))
        L = end - start
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        scores = (qd @ kd.transpose(1, 2) * scale).masked_fill(~causal, float("-inf"))
        lse_docs.append(torch.logsumexp(scores, dim=-1))
    o_ref, lse_ref = torch.cat(o_docs), torch.cat(lse_docs, dim=1)
    grads_ref = torch.autograd.grad((o_ref * grad_o).sum(), inputs)

    assert_close(o, o_ref)
    assert_close(lse, lse_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref)


def dense_masked_attention(q, k, v, cu_q, cu_k, scale, causal):
    """One [Tq, Tk] score matrix with a document (and bottom-right causal) mask, fp64."""
    q_doc = torch.repeat_interleave(torch.arange(len(cu_q) - 1), torch.diff(cu_q))
    k_doc = torch.repeat_interleave(torch.arange(len(cu_k) - 1), torch.diff(cu_k))
    q_pos = torch.arange(q.shape[0]) - cu_q[q_doc]
    k_pos = torch.arange(k.shape[0]) - cu_k[k_doc]
    visible = q_doc[:, None] == k_doc[None, :]
    if causal:  # align segment ends: query i sees keys up to i + Lk - Lq
        shift = (torch.diff(cu_k) - torch.diff(cu_q))[q_doc]
        visible &= k_pos[None, :] <= (q_pos + shift)[:, None]
    group = q.shape[1] // k.shape[1]
    kx, vx = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kx) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1))  # rows that see nothing -> 0
    return torch.einsum("hqk,khd->qhd", probs, vx), lse


@pytest.mark.parametrize("causal", [True, False])
def test_different_q_and_k_segments_match_dense_mask(gen, causal):
    lengths_k = random_lengths(gen, 4, 1, 12)
    lengths_q = [int(torch.randint(1, lk + 1, (1,), generator=gen)) for lk in lengths_k]  # Lq <= Lk
    cu_q, cu_k = cu_from_lengths(lengths_q), cu_from_lengths(lengths_k)
    q, k, v = random_qkv(gen, sum(lengths_q), sum(lengths_k), H=6, Hkv=3)
    scale = 0.3

    o, lse = softmax_attention_varlen_reference(q, k, v, cu_q, cu_k, scale=scale, causal=causal)
    o_ref, lse_ref = dense_masked_attention(q, k, v, cu_q.long(), cu_k.long(), scale, causal)
    assert_close(o, o_ref)
    assert_close(lse, lse_ref)
    # The public entry takes cu_seqlens_k as a keyword.
    o_pub, _ = softmax_attention_varlen(q, k, v, cu_q, scale=scale, causal=causal, cu_seqlens_k=cu_k)
    assert_close(o_pub, o_ref)


def test_rows_that_see_no_key_are_zero_with_minus_inf_lse(gen):
    """Lq > Lk under bottom-right causal alignment, and an empty key segment."""
    cu_q, cu_k = cu_from_lengths([5, 2]), cu_from_lengths([3, 0])
    q, k, v = random_qkv(gen, 7, 3)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    o, lse = softmax_attention_varlen_reference(q, k, v, cu_q, cu_k, causal=True)
    blind = torch.tensor([True, True, False, False, False, True, True])  # first 2 of doc 0, all of doc 1
    assert (o[blind] == 0).all() and torch.isneginf(lse[:, blind]).all()
    o_ref, lse_ref = dense_masked_attention(q, k, v, cu_q.long(), cu_k.long(), 1 / math.sqrt(8), True)
    assert_close(o, o_ref)
    assert_close(lse[:, ~blind], lse_ref[:, ~blind])
    grads = torch.autograd.grad(o.sum() + lse[:, ~blind].sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs(gen, dtype, tol):
    cu = cu_from_lengths([9, 17])
    q, k, v = random_qkv(gen, 26, 26)
    o_ref, lse_ref = softmax_attention_varlen_reference(q, k, v, cu)
    o, lse = softmax_attention_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert (o.double() - o_ref).norm() / o_ref.norm() < tol
    assert (lse.double() - lse_ref).abs().max() < tol * 10


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"k": torch.zeros(6, 3, 8), "v": torch.zeros(6, 3, 8)},
            r"q heads \(4\) must be a multiple of k/v heads \(3\)",
        ),
        ({"v": torch.zeros(6, 2, 4)}, "k and v must have the same shape"),
        ({"cu_seqlens": torch.tensor([0, 2, 5])}, "cu_seqlens_q must start at 0 and end at 6"),
        ({"cu_seqlens_k": torch.tensor([0, 6])}, "same length"),
        ({"q": torch.zeros(6, 4)}, "q must be"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    args = {
        "q": torch.zeros(6, 4, 8),
        "k": torch.zeros(6, 2, 8),
        "v": torch.zeros(6, 2, 8),
        "cu_seqlens": cu_from_lengths([2, 4]),
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        softmax_attention_varlen(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_varlen_attn_matches_reference(gen, causal):
    lengths = [1, 37, 128, 5]
    cu = cu_from_lengths(lengths).cuda()
    q, k, v = (
        x.cuda().to(torch.bfloat16) for x in random_qkv(gen, sum(lengths), sum(lengths), H=8, Hkv=2, d=64)
    )
    o, lse = softmax_attention_varlen(q, k, v, cu, causal=causal)
    o_ref, lse_ref = softmax_attention_varlen_reference(q, k, v, cu, causal=causal)
    assert lse.shape == lse_ref.shape == (8, sum(lengths))
    assert (o.float() - o_ref.float()).norm() / o_ref.float().norm() < 1e-2
    assert (lse - lse_ref).abs().max() < 1e-2

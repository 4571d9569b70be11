"""Varlen ring attention on CP ranks (gloo) equals single-process causal attention within documents."""

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed

from kernels.softmax_attention import softmax_attention_varlen_reference
from parallel.ring_attention import _block_backward_reference, ring_attention
from parallel.zigzag import check_window, shard_batch

T, H, HKV, D = 32, 4, 2, 8  # GQA: 2 query heads per kv head
CASES = {
    "crossing": [0, 5, 19, 32],
    "chunk_edge": [0, 8, 12, 24, 32],
    "many_short": [0, 1, 3, 4, 7, 9, 10, 14, 15, 15, 18, 21, 22, 25, 27, 28, 31, 32],
    "one_document": [0, 32],
    "two_windows": [0, 5, 19, 32, 40, 64],
}


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _ring_vs_full(rank, cp):
    results = {}
    for name, cu in CASES.items():
        cu = torch.tensor(cu)
        n = int(cu[-1])
        gen = torch.Generator().manual_seed(len(name))
        q, w = torch.randn(n, H, D, generator=gen), torch.randn(n, H, D, generator=gen)
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        o_full, _ = softmax_attention_varlen_reference(*full, cu, cu, scale=0.3, causal=True)
        (o_full * w).sum().backward()
        local = shard_batch({"input_ids": torch.arange(n), "cu_seqlens": cu}, T, rank, cp)
        idx = local["input_ids"]
        mine = [t[idx].clone().requires_grad_() for t in (q, k, v)]
        o = ring_attention(*mine, local["cu_seqlens"], local["positions"], check_window(T, cp), dist.group.WORLD,
                           scale=0.3)
        (o * w[idx]).sum().backward()
        results[name] = [_rel_err(o, o_full[idx])] + [_rel_err(m.grad, f.grad[idx]) for m, f in zip(mine, full)]
        # attention restricted to the local segments is wrong wherever a document crosses a chunk edge
        o_local, _ = softmax_attention_varlen_reference(*(t.detach() for t in mine), local["cu_seqlens"], scale=0.3)
        results[name].append(_rel_err(o_local, o_full[idx].detach()))
    return results


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_matches_full_window(cp):
    ranks = run_distributed(_ring_vs_full, cp)
    for rank in ranks:
        for name, errors in rank.items():
            assert max(errors[:4]) < 1e-5, (cp, name, errors)
    for name in ("crossing", "one_document", "two_windows"):
        assert max(rank[name][4] for rank in ranks) > 1e-2, name


def test_block_backward_matches_autograd():
    # the hand-written block backward (merged output and LSE given) against autograd of the reference
    gen = torch.Generator().manual_seed(0)
    q, do = torch.randn(10, H, D, generator=gen), torch.randn(10, H, D, generator=gen)
    k, v = torch.randn(12, HKV, D, generator=gen), torch.randn(12, HKV, D, generator=gen)
    cu_q, cu_k = torch.tensor([0, 3, 10]), torch.tensor([0, 5, 12])
    for causal in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse = softmax_attention_varlen_reference(*leaves, cu_q, cu_k, scale=0.5, causal=causal)
        (o * do).sum().backward()
        grads = _block_backward_reference(do, q, k, v, o.detach(), lse.detach(), cu_q, cu_k, causal, 0.5)
        for got, leaf in zip(grads, leaves):
            torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-6)

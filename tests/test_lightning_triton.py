"""Triton lightning attention against an fp64 token-by-token recurrence.

On CPU the kernels run under TRITON_INTERPRET=1 (set by `make test`) at tiny sizes; without
the interpreter and without a GPU these tests skip. Inputs and document layouts are drawn
fresh every run; the seed is in every failure message.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")

from kernels.lightning_triton import lightning_attention_triton

DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def recurrence_fp64(q, k, v, slope, cu, h0):
    """S_t = exp(-slope) S_{t-1} + k_t^T v_t, o_t = q_t S_t; state reset per document."""
    q, k, v, slope = q.double(), k.double(), v.double(), slope.double()
    H, dk, dv = q.shape[1], q.shape[2], v.shape[2]
    decay = torch.exp(-slope)[:, None, None]
    outs, finals = [], []
    for n in range(len(cu) - 1):
        S = h0[n].double() if h0 is not None else q.new_zeros(H, dk, dv)
        for t in range(cu[n], cu[n + 1]):
            S = decay * S + k[t][:, :, None] * v[t][:, None, :]
            outs.append(torch.einsum("hk,hkv->hv", q[t], S))
        finals.append(S)
    return torch.stack(outs), torch.stack(finals)


def random_lengths(rng, total, chunk):
    """Document lengths summing to `total`: two of length 1, one crossing chunk boundaries."""
    lens = [1, 1, chunk + rng.randint(1, chunk - 1)]
    while sum(lens) < total:
        lens.append(rng.randint(1, 2 * chunk + 7))
    lens[-1] -= sum(lens) - total
    lens = [n for n in lens if n > 0]
    rng.shuffle(lens)
    return lens


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_case(seed, dtype, T, H, dk, dv, lens=None, with_h0=True, with_final=True, **kw):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    q, k = randn(T, H, dk, scale=dk**-0.5), randn(T, H, dk, scale=dk**-0.5)
    v = randn(T, H, dv)
    slope = (torch.rand(H, generator=gen) * 0.9 + 0.02).to(DEVICE)
    cu = [0] + list(torch.tensor(lens).cumsum(0).tolist()) if lens else [0, T]
    N = len(cu) - 1
    h0 = randn(N, H, dk, dv, scale=0.3) if with_h0 else None
    do, dht = randn(T, H, dv), randn(N, H, dk, dv)

    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    h0_leaf = h0.clone().requires_grad_() if with_h0 else None
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE) if lens else None
    o, ht = lightning_attention_triton(*leaves, slope, cu_t, h0_leaf, with_final, **kw)
    assert o.dtype == dtype and o.shape == (T, H, dv)
    loss = (o.float() * do).sum()
    if with_final:
        assert ht.dtype == torch.float32 and ht.shape == (N, H, dk, dv)
        loss = loss + (ht * dht).sum()
    else:
        assert ht is None
    wrt = leaves + ([h0_leaf] if with_h0 else [])
    grads = torch.autograd.grad(loss, wrt)

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_h0 = h0.double().requires_grad_() if with_h0 else None
    ro, rht = recurrence_fp64(*ref_leaves, slope, cu, ref_h0)
    ref_loss = (ro * do.double()).sum() + ((rht * dht.double()).sum() if with_final else 0)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves + ([ref_h0] if with_h0 else []))

    tol = TOL[dtype]
    errs = {"o": rel(o, ro)}
    if with_final:
        errs["final_state"] = rel(ht, rht)
    for name, g, rg in zip(["dq", "dk", "dv", "dh0"], grads, ref_grads):
        errs[name] = rel(g, rg)
    bad = {n: e for n, e in errs.items() if not e < tol}  # NaN fails too
    assert not bad, f"seed={seed} dtype={dtype} lens={lens} errors over {tol}: {bad} (all: {errs})"
    return errs


def fresh_seed():
    return random.SystemRandom().randrange(2**31)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_documents_with_states(dtype):
    """Output, final state and all gradients; length-1 documents, documents crossing chunks
    and segments, chunk 16 / segment 32 so every document spans several of each."""
    seed = fresh_seed()
    lens = random_lengths(random.Random(seed), total=random.Random(seed + 1).randint(90, 130), chunk=16)
    run_case(seed, dtype, sum(lens), 2, 16, 16, lens=lens, chunk_size=16, segment_size=32)


def test_single_sequence_default_chunk_rectangular_heads():
    """No cu_seqlens, no states, d_k != d_v, default chunk (64) with a partial last chunk."""
    run_case(fresh_seed(), torch.float32, 100, 2, 32, 16, with_h0=False, with_final=False)


def test_head_dim_64():
    seed = fresh_seed()
    run_case(seed, torch.float32, 70, 1, 64, 64, lens=[1, 37, 32], chunk_size=32, segment_size=32)


def test_empty_documents_keep_their_state():
    seed = fresh_seed()
    errs = run_case(seed, torch.float32, 40, 2, 16, 16, lens=[0, 5, 0, 35], chunk_size=16, segment_size=32)
    assert errs["dh0"] < 1e-4


def test_rejects_unsupported_inputs():
    def qkv(T=8, d=16, dtype=torch.float32, dv=None):
        return (torch.randn(T, 2, d, dtype=dtype, device=DEVICE), torch.randn(T, 2, d, dtype=dtype, device=DEVICE),
                torch.randn(T, 2, dv or d, dtype=dtype, device=DEVICE))

    slope = torch.ones(2, device=DEVICE)
    for bad, match in [(qkv(d=48), "d_k=48"), (qkv(d=256), "d_k=256"), (qkv(dv=24), "d_v=24"),
                       (qkv(dtype=torch.float64), "dtype")]:
        with pytest.raises(ValueError, match=match):
            lightning_attention_triton(*bad, slope)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dtype"):
        lightning_attention_triton(q, k.bfloat16(), v, slope)
    with pytest.raises(ValueError, match="chunk_size"):
        lightning_attention_triton(q, k, v, slope, chunk_size=24)
    with pytest.raises(ValueError, match="segment_size"):
        lightning_attention_triton(q, k, v, slope, chunk_size=16, segment_size=40)


def test_dispatcher_uses_triton_when_forced(monkeypatch):
    from kernels.lightning_attention import lightning_attention
    from kernels.lightning_reference import lightning_attention_chunked

    monkeypatch.setenv("MINIMAX_LIGHTNING_BACKEND", "triton")
    gen = torch.Generator().manual_seed(fresh_seed())
    q, k, v = [torch.randn(40, 2, 16, generator=gen).to(DEVICE) * 0.3 for _ in range(3)]
    slope = torch.tensor([0.1, 0.7], device=DEVICE)
    cu = torch.tensor([0, 1, 20, 40], dtype=torch.int32, device=DEVICE)
    o, ht = lightning_attention(q, k, v, slope, cu, None, True)
    ro, rht = lightning_attention_chunked(q.double(), k.double(), v.double(), slope.double(), cu, None, True)
    assert rel(o, ro) < 1e-4 and rel(ht, rht) < 1e-4


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="GPU only")
def test_gpu_16k_packed_bf16():
    """The GPU check of the issue at 16K tokens (H=4, d=128), against an fp64 chunked reference."""
    from kernels.lightning_reference import lightning_attention_chunked

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    T, H, d = 16384, 4, 128
    lens = random_lengths(random.Random(seed), T, 64)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
    q, k = [(torch.randn(T, H, d, generator=gen) * d**-0.5).cuda() for _ in range(2)]
    v = torch.randn(T, H, d, generator=gen).cuda()
    slope = (torch.rand(H, generator=gen) * 0.9 + 0.02).cuda()
    h0 = (torch.randn(len(lens), H, d, d, generator=gen) * 0.3).cuda()
    do = torch.randn(T, H, d, generator=gen).cuda()
    leaves = [x.bfloat16().requires_grad_() for x in (q, k, v)] + [h0.clone().requires_grad_()]
    o, ht = lightning_attention_triton(*leaves[:3], slope, cu, leaves[3], True)
    grads = torch.autograd.grad((o.float() * do).sum() + ht.sum(), leaves)
    ref = [x.detach().double().requires_grad_() for x in leaves]
    ro, rht = lightning_attention_chunked(*ref[:3], slope.double(), cu, ref[3], True)
    rgrads = torch.autograd.grad((ro * do.double()).sum() + rht.sum(), ref)
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "dh0"], [o, ht, *grads], [ro, rht, *rgrads]):
        assert rel(a, b) < 1e-2, f"seed={seed} {name}: {rel(a, b)}"


def test_model_layer_same_with_either_backend(monkeypatch):
    """The model's lightning layer gives the same outputs and gradients on both paths."""
    from model.attention import LightningAttention
    from model.config import ModelConfig

    cfg = ModelConfig(hidden_size=32, num_heads=2, head_dim=16, num_layers=4)
    gen = torch.Generator().manual_seed(fresh_seed())
    layer = LightningAttention(cfg, layer_idx=1).to(DEVICE)
    x = torch.randn(45, 32, generator=gen).to(DEVICE)
    cu = torch.tensor([0, 1, 30, 45], dtype=torch.int32, device=DEVICE)

    results = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("MINIMAX_LIGHTNING_BACKEND", backend)
        xg = x.clone().requires_grad_()
        y = layer(xg, cu, None)
        grads = torch.autograd.grad((y * y).sum(), [xg, *layer.parameters()])
        results.append((y, grads))
    (y_ref, g_ref), (y_tri, g_tri) = results
    assert rel(y_tri, y_ref) < 1e-4
    for a, b in zip(g_tri, g_ref):
        assert rel(a, b) < 1e-4

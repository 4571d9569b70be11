"""Chunked LM head + cross-entropy (single-process and vocab-parallel) against plain logits + F.cross_entropy."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import run_distributed
from torch.utils._python_dispatch import TorchDispatchMode

from model.linear_cross_entropy import head_activation_bytes, linear_cross_entropy, loss_chunk_tokens
from parallel.vocab_parallel_loss import vocab_parallel_linear_cross_entropy

T, H, V = 37, 16, 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(gen, dtype, tokens=T, vocab=V):
    hidden = torch.randn(tokens, H, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(vocab, H, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.randperm(tokens, generator=gen)[: tokens // 4]] = -100
    return hidden, weight, labels


def loss_and_grads(loss_fn, hidden, weight, labels, **kwargs):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight, labels, **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def reference(hidden, weight, labels):
    """Plain fp64 logits [T, V]."""
    return F.cross_entropy(hidden.double() @ weight.double().T, labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 16, None])  # None: the default chunk covers all 37 tokens
def test_matches_fp64_reference(gen, dtype, tol, chunk_tokens):
    hidden, weight, labels = make_inputs(gen, dtype)
    loss, grad_hidden, grad_weight = loss_and_grads(linear_cross_entropy, hidden, weight, labels,
                                                    chunk_tokens=chunk_tokens)
    ref_loss, ref_hidden, ref_weight = loss_and_grads(reference, hidden, weight, labels)
    assert loss.dtype == torch.promote_types(dtype, torch.float32) and loss.ndim == 0
    assert grad_hidden.dtype == grad_weight.dtype == dtype
    for got, want in [(loss, ref_loss), (grad_hidden, ref_hidden), (grad_weight, ref_weight)]:
        assert rel_err(got, want) < tol


def test_backward_vocab_blocks_of_64_rows_with_a_partial_last(gen):
    hidden, weight, labels = make_inputs(gen, torch.float64, tokens=20, vocab=1000)  # blocks 3 * 1000 // 20 -> 128
    got = loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_tokens=3)
    for a, b in zip(got, loss_and_grads(reference, hidden, weight, labels)):
        assert rel_err(a, b) < 1e-10


def test_all_ignored_and_scaled_grad_output(gen):
    hidden, weight, labels = make_inputs(gen, torch.float64)
    ignored = loss_and_grads(linear_cross_entropy, hidden, weight, torch.full_like(labels, -100))
    assert ignored[0].item() == 0.0 and not ignored[1].any() and not ignored[2].any()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (3.0 * linear_cross_entropy(h, w, labels, chunk_tokens=8)).backward()
    _, ref_hidden, ref_weight = loss_and_grads(reference, hidden, weight, labels)
    assert rel_err(h.grad, 3.0 * ref_hidden) < 1e-10 and rel_err(w.grad, 3.0 * ref_weight) < 1e-10


def test_tied_weight_accumulates_with_embedding(gen):
    """The head's weight is the embedding table: both gradients land in the one parameter."""
    _, table, labels = make_inputs(gen, torch.float64)
    input_ids = torch.randint(0, V, (T,), generator=gen)
    mix = torch.randn(H, H, generator=gen, dtype=torch.float64)

    def run(loss_fn):
        weight = table.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(input_ids, weight) @ mix)
        loss_fn(hidden, weight, labels).backward()
        return weight.grad

    tied = run(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=6))
    assert rel_err(tied, run(reference)) < 1e-10


def test_bf16_autocast_close_to_linear_under_autocast(gen):
    hidden, weight, labels = make_inputs(gen, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad_hidden, grad_weight = loss_and_grads(linear_cross_entropy, hidden, weight, labels,
                                                        chunk_tokens=10)
        ref = loss_and_grads(lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y, reduction="sum"),
                             hidden, weight, labels)
    assert loss.dtype == grad_hidden.dtype == grad_weight.dtype == torch.float32
    for got, want in zip((loss, grad_hidden, grad_weight), ref):
        assert rel_err(got, want) < 2e-2


class OpRecorder(TorchDispatchMode):
    """Records the largest tensor any op produces and the dtypes matrix products run in."""

    def __init__(self):
        super().__init__()
        self.largest, self.matmul_dtypes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.largest = max([self.largest] + [t.numel() for t in torch.utils._pytree.tree_leaves(out)
                                             if isinstance(t, torch.Tensor)])
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.matmul_dtypes.add(out.dtype)
        return out


def record(loss_fn, hidden, weight, labels, autocast: bool) -> OpRecorder:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), OpRecorder() as seen:
        loss_and_grads(loss_fn, hidden, weight, labels)
    return seen


@pytest.mark.parametrize("autocast", [False, True])
def test_never_allocates_full_logits(gen, autocast):
    tokens, chunk = 80, 12  # tokens > H and V > H: weight [V, H] and hidden [T, H] are smaller than [T, V]
    hidden, weight, labels = make_inputs(gen, torch.float32, tokens=tokens)
    seen = record(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=chunk), hidden, weight, labels,
                  autocast)
    assert seen.largest == max(chunk * V, V * H, tokens * H)
    assert seen.matmul_dtypes == {torch.bfloat16 if autocast else torch.float32}
    assert record(reference, hidden, weight, labels, autocast).largest == tokens * V  # the recorder sees [T, V]


def test_chunk_budget_and_bytes():
    assert loss_chunk_tokens(200_064) == 670 and loss_chunk_tokens(1) == 2**27 and loss_chunk_tokens(2**30) == 1
    # bf16: kept hidden [T, h] bf16 + lse [T]; transient: weight cast, a chunk's fp32 logits and bf16 copy
    tokens, hidden, vocab = 8192, 6144, 25_008
    expected = tokens * (hidden * 2 + 4) + vocab * hidden * 2 + loss_chunk_tokens(vocab) * vocab * 6
    assert head_activation_bytes(tokens, hidden, vocab, 2) == expected
    assert head_activation_bytes(10, hidden, vocab, 4) == 10 * (hidden * 4 + 4) + 10 * vocab * 4


def _vocab_parallel(rank, world, hidden, weight, labels, chunk_tokens):
    group = dist.new_group(list(range(world)))
    shard = weight.shape[0] // world
    return loss_and_grads(vocab_parallel_linear_cross_entropy, hidden, weight[rank * shard:(rank + 1) * shard],
                          labels, group=group, vocab_start=rank * shard, chunk_tokens=chunk_tokens)


def test_vocab_parallel_tp2_matches_single_process():
    gen = torch.Generator().manual_seed(3)
    hidden, weight, labels = make_inputs(gen, torch.float32)
    # a label per shard boundary side, so both ranks own picked logits
    labels[:4] = torch.tensor([0, V // 2 - 1, V // 2, V - 1])
    chunk = 9
    loss, grad_hidden, grad_weight = loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_tokens=chunk)
    ranks = run_distributed(_vocab_parallel, 2, hidden, weight, labels, chunk)
    for rank_loss, _, _ in ranks:
        assert rel_err(rank_loss, loss) < 1e-6
    assert rel_err(sum(r[1] for r in ranks), grad_hidden) < 1e-6  # the caller's region sums the partials
    assert rel_err(torch.cat([r[2] for r in ranks]), grad_weight) < 1e-6


def test_vocab_parallel_without_group_is_single_process(gen):
    hidden, weight, labels = make_inputs(gen, torch.float64)
    got = loss_and_grads(vocab_parallel_linear_cross_entropy, hidden, weight, labels, group=None, vocab_start=0,
                         chunk_tokens=7)
    for a, b in zip(got, loss_and_grads(reference, hidden, weight, labels)):
        assert rel_err(a, b) < 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_peak_memory_matches_head_activation_bytes():
    tokens, hidden_size, vocab = 8192, 1024, 65_536
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device="cuda", generator=gen, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    for _ in range(2):  # the first step also allocates cuBLAS's workspace
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, labels)
        loss.backward()
    torch.cuda.synchronize()
    returned_grads = (tokens + vocab) * hidden_size * 4
    measured = torch.cuda.max_memory_allocated() - base - returned_grads
    predicted = head_activation_bytes(tokens, hidden_size, vocab, 2)
    assert 0.9 * predicted <= measured <= 1.05 * predicted + 2**20
    ref = F.cross_entropy(hidden.detach() @ weight.detach().T, labels, reduction="sum")
    assert rel_err(loss.detach(), ref) < 1e-2

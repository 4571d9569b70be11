"""GradSync (bucketed, overlapped) and the ZeRO-1 AdamW against plain all-reduce + torch AdamW.

The end-to-end layouts (TP x DP with the real model) are in test_tensor_parallel.py; here a toy model checks the
pieces: which group each gradient is summed over, bucket layout and padding, accumulation with no_sync, the
distributed grad norm, ZeRO-1 steps with padded shards, and the optimizer state round trip.
"""

import pytest
import torch
from dist_harness import run_distributed
from torch import nn


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)  # 15 + 3 elements: odd sizes force padded shards
        self.norm = nn.Parameter(torch.ones(3))
        self.norm.tp_partial_grad = True
        self.mlp = nn.Module()
        self.mlp.experts = nn.Module()
        self.mlp.experts.w = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return (self.lin(x) * self.norm).tanh() @ self.mlp.experts.w.t()


def _inputs(rank, micro):
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(100 * rank + micro))


def _loss(model, x):
    return model(x).pow(2).sum()


def _sync_and_step(rank, world, overlap):
    import torch.distributed as dist

    from parallel.optimizer import build_optimizer
    from parallel.topology import Topology

    topo = Topology.build()
    torch.manual_seed(0)
    model, ref = Toy(), Toy()
    ref.load_state_dict(model.state_dict())
    opt, grad_sync = build_optimizer(model, topo, lr=1e-2, weight_decay=0.1, bucket_numel=10, overlap=overlap)
    groups = [{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    ref_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    out = {"buckets": [(b.group_name, b.decay, b.names, b.numel) for b in grad_sync.buckets]}
    for step in range(2):
        for micro in range(2):  # accumulation: the early all-reduce only in the last micro-batch
            with grad_sync.no_sync() if micro == 0 else torch.enable_grad():
                _loss(model, _inputs(rank, micro)).backward()
            _loss(ref, _inputs(rank, micro)).backward()
        grad_sync.finish()
        for p in ref.parameters():  # the plain truth: sum over all ranks
            dist.all_reduce(p.grad)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, s=step, n=name: f"step {s} grad {n}: {m}")
        norm = grad_sync.clip_grad_norm_(0.5)
        ref_norm = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5))
        assert abs(norm - ref_norm) <= 1e-6 * ref_norm, (norm, ref_norm)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, s=step, n=name: f"step {s} param {n}: {m}")

    # the optimizer state as whole tensors, and back
    state, step = opt.full_state()
    assert step == 2
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=1e-6, atol=1e-8)
    opt.load_full_state({p: {k: v * 2 for k, v in s.items()} for p, s in state.items()}, 7)
    doubled, step = opt.full_state()
    assert step == 7 and all(torch.equal(doubled[p]["exp_avg_sq"], 2 * state[p]["exp_avg_sq"]) for p in state)

    # a second backward without zero_grad() after the step would double-count: refused
    grad_sync.finish()
    with pytest.raises(RuntimeError, match="zero_grad"):
        _loss(model, _inputs(rank, 0)).backward()
    return out


@pytest.mark.parametrize("overlap", [False, True])
def test_grad_sync_and_zero1_match_allreduce_adamw(overlap):
    buckets = run_distributed(_sync_and_step, 2, overlap)[0]["buckets"]
    # reverse order of named_parameters (norm, lin.*, mlp.*); a bucket closes at 10 elements; groups and decay classes never mix
    assert buckets == [
        ("dp_cp", True, ["lin.weight"], 16),  # padded to a multiple of 2 shards
        ("edp", True, ["mlp.experts.w"], 6),
        ("dp_cp", False, ["lin.bias"], 4),
        ("tp_dp_cp", False, ["norm"], 4),
    ]


def test_params_live_in_the_optimizer_buffers():
    from parallel.optimizer import build_optimizer
    from parallel.topology import Topology

    model = Toy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, _grad_sync = build_optimizer(model, Topology.build(), lr=1e-2)
    for (name, p) in model.named_parameters():
        assert torch.equal(p, before[name])
        assert any(p.untyped_storage().data_ptr() == f.untyped_storage().data_ptr() for f in opt.flat_params)
    assert opt.impl in ("fused", "foreach")
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}

"""GradSync (bucketed, reduce-scattered, overlapped) and the distributed AdamW against all-reduce + torch AdamW.

The end-to-end layouts (TP x DP with the real model) are in test_tensor_parallel.py; here a toy model checks the
pieces: which group each gradient is summed over, bucket layout and padding, accumulation with no_sync, the
distributed grad norm, steps with padded slices, and bf16 parameters with fp32 master weights.
"""

import pytest
import torch
from dist_harness import run_distributed
from torch import nn

from parallel.shard import ShardSpec, mark_partial_over_tp


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)  # 15 + 3 elements: odd sizes force padded shards
        self.norm = nn.Parameter(torch.ones(3))
        self.norm.shard = ShardSpec.whole((3,))
        mark_partial_over_tp(self.norm)
        self.mlp = nn.Module()
        self.mlp.experts = nn.Module()
        self.mlp.experts.w = nn.Parameter(torch.randn(2, 3))
        self.mlp.experts.w.shard = ShardSpec((2, 3), (0, 0), (2, 3), expert=True)

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
    out = {"buckets": [(b.grad_group, b.decay, b.names, b.numel) for b in grad_sync.buckets]}
    for step in range(2):
        for micro in range(2):  # accumulation: the early all-reduce only in the last micro-batch
            with grad_sync.no_sync() if micro == 0 else torch.enable_grad():
                _loss(model, _inputs(rank, micro)).backward()
            _loss(ref, _inputs(rank, micro)).backward()
        grad_sync.finish()
        for p in ref.parameters():  # the plain truth: sum over all ranks
            dist.all_reduce(p.grad)
        grads = grad_sync.param_grads()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(grads[name], q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, s=step, n=name: f"step {s} grad {n}: {m}")
        norm = grad_sync.clip_grad_norm_(0.5)
        ref_norm = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5))
        assert abs(norm - ref_norm) <= 1e-6 * ref_norm, (norm, ref_norm)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, s=step, n=name: f"step {s} param {n}: {m}")

    assert opt.step_count == 2
    for b, master, moments in opt.slices():  # each rank's moments are its slice of the whole model's
        lo, hi = b.shard
        whole = torch.cat([ref_opt.state[q]["exp_avg"].reshape(-1) for q in
                           [dict(ref.named_parameters())[n] for n in b.names]])
        whole = torch.nn.functional.pad(whole, (0, b.numel - whole.numel()))
        torch.testing.assert_close(moments["exp_avg"], whole[lo:hi], rtol=1e-6, atol=1e-8)
    return out


@pytest.mark.parametrize("overlap", [False, True])
def test_grad_sync_and_distributed_adamw_match_allreduce_adamw(overlap):
    buckets = run_distributed(_sync_and_step, 2, overlap)[0]["buckets"]
    # reverse order of named_parameters (norm, lin.*, mlp.*); a bucket closes at 10 elements; groups and decay classes never mix
    assert buckets == [
        ("dp_cp", True, ["lin.weight"], 16),  # padded to a multiple of 2 shards
        ("edp", True, ["mlp.experts.w"], 6),
        ("dp_cp", False, ["lin.bias"], 4),
        ("tp_dp_cp", False, ["norm"], 4),
    ]


def test_params_live_in_the_buckets_and_bf16_params_keep_fp32_masters():
    from parallel.optimizer import build_optimizer
    from parallel.topology import Topology

    model = Toy().to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, grad_sync = build_optimizer(model, Topology.build(), lr=1e-2)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
        assert any(p.untyped_storage().data_ptr() == b.flat_params.untyped_storage().data_ptr()
                   for b in grad_sync.buckets)
    assert opt.impl in ("fused", "foreach")
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}
    assert all(b.main_grad.dtype == torch.float32 and b.flat_params.dtype == torch.bfloat16 for b in grad_sync.buckets)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)).bfloat16()
    losses = []
    for _ in range(20):
        loss = _loss(model, x)
        loss.backward()
        grad_sync.finish()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    for master, b in zip(opt.masters, grad_sync.buckets):  # fp32 masters; the parameters are their bf16 copy
        assert master.dtype == torch.float32 and torch.equal(b.flat_params, master.to(torch.bfloat16))

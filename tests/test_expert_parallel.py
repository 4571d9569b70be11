"""Expert parallelism (EP x ETP x EDP, gloo) against the single-process model applying the same routing rule.

Each rank holds different tokens; the single-process reference runs the concatenation of all ranks' batches
(rank order = MoE parallel folding: ETP index fastest, then EP, then EDP) with its MoE layers applying the same
global or local capacity rule per router group (one group per EDP replica), built from the pure functions in
parallel/global_router.py. Trainer convention: rank loss = loss_sum / global tokens + aux / world, gradients
summed over data-parallel ranks (dense: the world; experts: EP x ETP inside the layer, then EDP).
"""

import copy
import types

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed

from model.config import ModelConfig
from model.moe import MoE, route_top_k, switch_aux_loss
from model.transformer import MiniMaxForCausalLM
from parallel.collectives import all_gather
from parallel.expert_parallel import check_expert_parallel_sizes
from parallel.global_router import capacity_per_rank, group_keep_mask, kept_counts
from parallel.moe_parallel import ExpertParallelMoE
from parallel.shard import spec_of

WORLD = 4
RANK_TOKENS = [24, 16, 20, 24]  # uneven on purpose
LR = 0.5
OVERLAP = [(m, g) for m, g in (("global", 1), ("global", 2), ("global", 4), ("local", 1))]


def tiny_cfg(**kw):
    # The tiny preset (8 experts, hidden 128, FFN 256) with 2 layers (lightning + softmax) and a small vocab;
    # capacity factor 0.75 so tokens really drop.
    base = {"vocab_size": 256, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "head_dim": 32,
            "num_kv_heads": 2, "softmax_period": 2, "num_experts": 8, "top_k": 2, "ffn_hidden_size": 256,
            "capacity_factor": 0.75}
    return ModelConfig(**{**base, **kw})


def folded_groups(world, ep, etp):
    """(ep_group, etp_group, edp_group) of this rank; rank = etp_idx + etp * (ep_idx + ep * edp_idx)."""
    rank = dist.get_rank()

    def coords(r):
        return r % etp, (r // etp) % ep, r // (ep * etp)

    mine = {}
    for axis in range(3):
        for key in sorted({tuple(c for a, c in enumerate(coords(r)) if a != axis) for r in range(world)}):
            members = [r for r in range(world) if tuple(c for a, c in enumerate(coords(r)) if a != axis) == key]
            group = dist.new_group(members) if len(members) > 1 else None
            if rank in members:
                mine[axis] = group
    return mine[1], mine[0], mine[2]


def make_batches(step):
    g = torch.Generator().manual_seed(100 + step)
    batches = []
    for T in RANK_TOKENS:
        ids = torch.randint(0, 256, (T,), generator=g)
        labels = torch.randint(0, 256, (T,), generator=g)
        labels[T // 3] = -100
        batches.append((ids, torch.tensor([0, T // 3 + 1, T]), labels))
    return batches


# ---------------------------------------------------------------- single-process reference

def reference_moe_forward(self, x, router_groups, mode):
    """MoE.forward on the global batch with the per-router-group rule; aux = mean of what the ranks report."""
    T, E, k = x.shape[0], self.num_experts, self.top_k
    routing = route_top_k(self.gate(x), k)
    keeps, aux, start = [], [], 0
    for sizes in router_groups:
        sl = slice(start, start + sum(sizes))
        keeps.append(group_keep_mask(routing.expert_idx[sl], routing.gates[sl], sizes, mode, self.capacity_factor, E))
        # global: every group's aux on its own statistics; local: every rank's aux on its own tokens
        for seg in ([sizes] if mode == "global" else [[n] for n in sizes]):
            s = slice(start, start + sum(seg))
            counts = torch.bincount(routing.expert_idx[s].flatten(), minlength=E)
            aux.append(switch_aux_loss(routing.probs[s], counts, sum(seg), k, self.aux_loss_coef))
            start += sum(seg)
    keep = torch.cat(keeps).flatten()
    token_idx = torch.arange(T, device=x.device).repeat_interleave(k)
    out = self.experts_forward(x, token_idx[keep], routing.expert_idx.flatten()[keep], routing.gates.flatten()[keep])
    aux_mean = sum(aux) / len(aux)  # the mean over ranks of what they report (groups have equal sizes)
    self.last_stats = {"aux_loss": aux_mean, "routed": T * k, "dropped": (~keep).sum(),
                       "tokens_per_expert": routing.tokens_per_expert}
    return out


def reference_run(state, ep, etp, mode):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: extra OpenMP threads only contend with the busy test machine
    try:
        return _reference_run(state, ep, etp, mode)
    finally:
        torch.set_num_threads(threads)


def _reference_run(state, ep, etp, mode):
    model = MiniMaxForCausalLM(tiny_cfg())
    model.load_state_dict(state)
    R = ep * etp
    router_groups = [RANK_TOKENS[i:i + R] for i in range(0, WORLD, R)]
    for layer in model.layers.values():
        layer.mlp.forward = types.MethodType(
            lambda self, x: reference_moe_forward(self, x, router_groups, mode), layer.mlp)
    losses, grads, dropped = [], [], []
    for step in range(2):
        batches = make_batches(step)
        ids = torch.cat([b[0] for b in batches])
        cu = torch.cat([torch.tensor([0])] + [b[1][1:] + sum(RANK_TOKENS[:i]) for i, b in enumerate(batches)])
        labels = torch.cat([b[2] for b in batches])
        model.zero_grad()
        out = model(ids, cu, labels)
        loss = out.loss_sum / out.num_tokens + out.aux_loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        dropped.append(int(out.moe_dropped))
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return losses, grads, dropped


# ---------------------------------------------------------------- parallel runs

def full_expert_grad(name, grad, ep_group, etp_group):
    ffn_dim = 1 if name.endswith("w_down") else 2
    return all_gather(all_gather(grad, etp_group, dim=ffn_dim), ep_group, dim=0)


def parallel_run(state, groups, mode, overlap_groups):
    ep_group, etp_group, edp_group = groups
    rank = dist.get_rank()
    model = MiniMaxForCausalLM(tiny_cfg())
    model.load_state_dict(state)
    for layer in model.layers.values():
        ExpertParallelMoE.convert(layer.mlp, ep_group, etp_group, router_mode=mode, overlap_groups=overlap_groups)
    losses, grads, stats = [], [], []
    for step in range(2):
        ids, cu, labels = make_batches(step)[rank]
        n_global = sum(int((b[2] != -100).sum()) for b in make_batches(step))
        model.zero_grad()
        out = model(ids, cu, labels)
        loss = out.loss_sum / n_global + out.aux_loss / WORLD
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
        params = dict(model.named_parameters())
        for p in params.values():  # expert shards: sum over the replicas that saw other tokens (EDP)
            if spec_of(p).expert and p.grad is not None and edp_group is not None:
                dist.all_reduce(p.grad, group=edp_group)
        full = {}
        for name, p in params.items():
            g = torch.zeros_like(p) if p.grad is None else p.grad
            if spec_of(p).expert:
                full[name] = full_expert_grad(name, g, ep_group, etp_group)
            else:
                dist.all_reduce(g)
                full[name] = g
        grads.append(full)
        # local drops summed over ranks; group drops summed over ranks count every router group R times
        R = dist.get_world_size(ep_group) * (dist.get_world_size(etp_group) if etp_group is not None else 1) \
            if ep_group is not None else 1
        dropped = torch.tensor([int(out.moe_dropped), sum(int(l.mlp.last_stats["group_dropped"]) for l in model.layers.values())])
        dist.all_reduce(dropped)
        aux = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(aux, out.aux_loss.detach())
        stats.append({"dropped": int(dropped[0]), "group_dropped": int(dropped[1]) // R, "aux": aux})
        with torch.no_grad():
            for name, p in params.items():
                p -= LR * (p.grad if spec_of(p).expert else full[name])
    return losses, grads, stats


def skewed_layer_drops(groups, mode):
    """Every rank sends all its tokens to its own pair of experts; group drops reported by the layer."""
    ep_group, etp_group, _ = groups
    rank, T, E = dist.get_rank(), 16, 8
    cfg = tiny_cfg(capacity_factor=1.0)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, :E] = 10 * torch.eye(E)
    layer = ExpertParallelMoE.convert(moe, ep_group, etp_group, router_mode=mode)
    x = 0.1 * torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
    x[:, 2 * rank % E] += 1.0
    x[:, (2 * rank + 1) % E] += 0.9
    layer(x)
    return int(layer.last_stats["group_dropped"]), float(layer.last_stats["drop_rate"])


def invalid_sizes(groups):
    ep_group, etp_group, _ = groups
    errors = []
    for kw in ({"num_experts": 5}, {"ffn_hidden_size": 129}):
        try:
            ExpertParallelMoE.convert(MoE(tiny_cfg(**kw)), ep_group, etp_group)
        except ValueError as e:
            errors.append(str(e))
    return errors


def _layout_worker(rank, world, ep, etp, state):
    groups = folded_groups(world, ep, etp)
    runs = {(m, g): parallel_run(state, groups, m, g) for m, g in OVERLAP}
    skew = {m: skewed_layer_drops(groups, m) for m in ("global", "local")}
    return {"runs": runs, "skew": skew, "errors": invalid_sizes(groups)} if rank == 0 else None


def assert_rel_close(actual, expected, what, rtol=1e-5):
    scale = expected.abs().max().clamp(min=1e-12)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol}"


@pytest.mark.parametrize("ep,etp", [(2, 2), (4, 1), (2, 1)], ids=["ep2-etp2", "ep4-etp1", "ep2-etp1-edp2"])
def test_expert_parallel_matches_single_process(ep, etp):
    torch.manual_seed(0)
    state = MiniMaxForCausalLM(tiny_cfg()).state_dict()
    result = run_distributed(_layout_worker, WORLD, ep, etp, state)[0]
    runs = result["runs"]
    for mode in ("global", "local"):
        ref_losses, ref_grads, ref_dropped = reference_run(state, ep, etp, mode)
        assert all(d > 0 for d in ref_dropped), "capacity factor must make tokens drop"
        losses, grads, stats = runs[mode, 1]
        for step in range(2):
            assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), f"{mode} step {step} loss"
            assert stats[step]["dropped"] == ref_dropped[step], f"{mode} step {step} dropped"
            assert stats[step]["group_dropped"] == ref_dropped[step], f"{mode} step {step} group stats"
            if mode == "global":  # every rank reports its router group's aux loss
                aux = torch.stack(stats[step]["aux"]).view(-1, ep * etp)
                assert torch.equal(aux, aux[:, :1].expand_as(aux)), aux
            for name, ref in ref_grads[step].items():
                assert_rel_close(grads[step][name], ref, f"{mode} step {step} grad {name}")
    # G token groups change nothing.
    base_losses, base_grads, _ = runs["global", 1]
    for g in (2, 4):
        losses, grads, _ = runs["global", g]
        assert losses == pytest.approx(base_losses, rel=1e-6)
        for step in range(2):
            for name, ref in base_grads[step].items():
                assert_rel_close(grads[step][name], ref, f"G={g} step {step} grad {name}", rtol=1e-6)
    # Skewed batch: the global rule drops strictly fewer than the local one, and the stats say so.
    R = ep * etp
    demand = torch.zeros(R, 8, dtype=torch.long)
    for r in range(R):
        demand[r, 2 * r % 8] += 16
        demand[r, (2 * r + 1) % 8] += 16
    for mode in ("global", "local"):
        expected = int((demand - kept_counts(demand, capacity_per_rank(mode, demand, 2, 1.0))).sum())
        assert result["skew"][mode][0] == expected
    assert result["skew"]["global"][0] < result["skew"]["local"][0]
    assert result["errors"][0].startswith(f"parallel.ep={ep} ")
    if etp > 1:
        assert result["errors"][1].startswith(f"parallel.etp={etp} ")


def _gpu_worker(rank, world, ep, etp, autocast):
    """EP layer on NCCL with real CUDA streams for G > 1, against the full layer on this rank's tokens (local rule)."""
    dev = torch.device("cuda", rank)
    ep_group, etp_group, _ = folded_groups(world, ep, etp)
    torch.manual_seed(0)
    full = MoE(tiny_cfg())
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.1)
    full = full.to(dev)
    g = torch.Generator().manual_seed(rank)
    x, dy = (torch.randn(48 + 16 * rank, 128, generator=g).to(dev) for _ in range(2))  # uneven token counts

    def run(layer):
        layer.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xr)
        y.float().backward(dy)
        grads = {}
        for name, p in layer.named_parameters():
            grad = p.grad.clone()
            if spec_of(p).expert:
                grad = full_expert_grad(name, grad, ep_group, etp_group)
            else:
                dist.all_reduce(grad)
            grads[name] = grad.cpu()
        return y.float().cpu(), xr.grad.cpu(), grads, int(layer.last_stats["dropped"])

    reference = run(full)  # not expert-parallel: every gradient summed over the ranks
    return {G: run(ExpertParallelMoE.convert(copy.deepcopy(full), ep_group, etp_group, "local", G)) for G in (1, 2, 4)}, reference


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32-loop", "bf16-grouped"])
@pytest.mark.parametrize("ep,etp", [(2, 1), (1, 2)], ids=["ep2", "etp2"])
def test_expert_parallel_on_gpus(ep, etp, autocast):
    rtol = 2e-2 if autocast else 1e-5
    for by_groups, (y_ref, dx_ref, grads_ref, dropped_ref) in run_distributed(_gpu_worker, 2, ep, etp, autocast,
                                                                              backend="nccl"):
        for G, (y, dx, grads, dropped) in by_groups.items():
            assert dropped == dropped_ref > 0, (G, dropped, dropped_ref)
            assert_rel_close(y, y_ref, f"G={G} output", rtol)
            assert_rel_close(dx, dx_ref, f"G={G} input grad", rtol)
            for name, ref in grads_ref.items():
                assert_rel_close(grads[name], ref, f"G={G} grad {name}", rtol)


def test_invalid_sizes_one_line():
    with pytest.raises(ValueError, match=r"^parallel.ep=3 does not divide model.num_experts=8$"):
        check_expert_parallel_sizes(8, 256, 3, 1)
    with pytest.raises(ValueError, match=r"^parallel.etp=3 does not divide model.ffn_hid"):
        check_expert_parallel_sizes(8, 256, 2, 3)
    with pytest.raises(ValueError, match=r"^moe.overlap_groups=0 must be >= 1$"):
        check_expert_parallel_sizes(8, 256, 2, 2, overlap_groups=0)
    with pytest.raises(ValueError, match=r"^router.mode='nearest'"):
        ExpertParallelMoE.convert(MoE(tiny_cfg()), None, None, router_mode="nearest")

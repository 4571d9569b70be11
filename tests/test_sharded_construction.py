"""Sharded construction: the same logical weights under every layout, and memory per rank that of its shard."""

import math

import torch
import torch.distributed as dist
from dist_harness import run_distributed

from model import MiniMaxForCausalLM, ModelConfig

SEQ_LEN, SEED = 32, 3
LAYOUTS = [{"tp": 2, "sequence_parallel": True}, {"ep": 2, "etp": 2}, {"tp": 2, "cp": 2}, {}]  # world 4


def tiny_config(**overrides) -> ModelConfig:
    cfg = {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "head_dim": 16, "num_kv_heads": 2,
           "softmax_period": 2, "num_experts": 4, "top_k": 2, "ffn_hidden_size": 64, "lightning_block_size": 16}
    return ModelConfig(**{**cfg, **overrides})


def _build(cfg, layout):
    from parallel.topology import Topology
    from trainer.layout import build_model

    topo = Topology.build(model_cfg=cfg, seq_len=SEQ_LEN, **layout)
    return topo, build_model(cfg, topo, torch.device("cpu"), SEED, recompute=False)


def _logical_weights(rank, world, cfg):
    """Per layout, the logical tensors assembled from every rank's blocks (NaN where no rank holds an element)."""
    from parallel.shard import spec_of

    out = {}
    for layout in LAYOUTS:
        topo, model = _build(cfg, layout)
        pieces = [(n, spec_of(p), p.detach().clone()) for n, p in model.named_parameters()]
        gathered = [None] * world
        dist.all_gather_object(gathered, pieces)
        full = {}
        for rank_pieces in gathered:
            for name, spec, block in rank_pieces:
                whole = full.setdefault(name, torch.full(spec.shape, float("nan")))
                box = tuple(slice(o, o + n) for o, n in zip(spec.offsets, spec.local_shape))
                held = whole[box]
                assert held.isnan().all() or torch.equal(held, block), f"{topo.describe()} {name}: replicas differ"
                whole[box] = block
        out[topo.describe()] = full
    return out if rank == 0 else None


def test_logical_weights_are_bit_identical_under_every_layout():
    cfg = tiny_config()
    reference = dict(MiniMaxForCausalLM(cfg, seed=SEED).named_parameters())
    _, single = _build(cfg, {})  # the meta path in one process equals the eager model
    for name, p in single.named_parameters():
        assert torch.equal(p, reference[name]), name
    assert not torch.equal(MiniMaxForCausalLM(cfg, seed=SEED + 1).embed_tokens.weight, reference["embed_tokens.weight"])
    for label, weights in run_distributed(_logical_weights, 4, cfg)[0].items():
        assert weights.keys() == reference.keys(), label
        for name, want in reference.items():
            assert torch.equal(weights[name], want.detach()), f"{label}: {name}"


def _construction_memory(rank, world, cfg):
    from parallel.shard import spec_of

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    _build(tiny_config(), {"tp": 2, "ep": 2})  # first use imports the kernels (Triton): not construction memory
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    _, model = _build(cfg, {"tp": 2, "ep": 2})
    peak_growth = status("VmHWM:") - before
    params = list({id(p): p for p in model.parameters()}.values())
    allocated = sum(p.untyped_storage().nbytes() for p in params)
    shard = sum(math.prod(spec_of(p).local_shape) * 4 for p in params)
    return allocated, shard, peak_growth


def test_construction_allocates_only_the_shard():
    cfg = tiny_config(vocab_size=16384, hidden_size=512, num_experts=8, ffn_hidden_size=1024, num_heads=8,
                      num_kv_heads=4, head_dim=64, num_layers=2)
    with torch.device("meta"):
        whole = sum(p.numel() for p in MiniMaxForCausalLM(cfg).parameters()) * 4
    allowance = 32 * 2 ** 20  # allocator and init temporaries (model.init generates 2^16 elements at a time)
    for allocated, shard, peak_growth in run_distributed(_construction_memory, 2, cfg):
        assert allocated == shard
        assert 1.3 * shard + allowance < whole  # the bound would catch a rank holding the whole model
        assert peak_growth <= 1.3 * shard + allowance, (peak_growth, shard, whole)

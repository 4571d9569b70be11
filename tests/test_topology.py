"""Topology: megatron-core's rank layout (MoE parallel folding) and one-line errors for every invalid setting."""

import pytest

from model import ModelConfig
from parallel.topology import DENSE_GROUPS, EXPERT_GROUPS, Topology, validate_layout

LAYOUTS = [  # tp, cp, pp, ep, etp, world
    (2, 2, 1, 2, 1, 8),
    (2, 1, 1, 4, 2, 8),
    (1, 2, 2, 2, 1, 8),
    (4, 1, 1, 8, 1, 8),
    (2, 2, 1, 1, 2, 8),
]


def cfg(**kw):
    base = {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "head_dim": 16, "num_kv_heads": 2,
                "num_experts": 8, "ffn_hidden_size": 64}
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("tp,cp,pp,ep,etp,world", LAYOUTS)
def test_groups_match_megatron(tp, cp, pp, ep, etp, world, monkeypatch):
    ps = pytest.importorskip("megatron.core.parallel_state")
    monkeypatch.setattr("parallel.topology.validate_layout", lambda *a, **k: None)  # pp > 1 is not runnable yet
    dp, edp = world // (tp * cp * pp), world // (ep * etp * pp)
    dense = ps.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    expert = ps.RankGenerator(tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    for rank in range(world):
        topo = Topology.build(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, world_size=world, rank=rank)
        for gen, table in ((dense, DENSE_GROUPS), (expert, EXPERT_GROUPS)):
            for name, token in table.items():
                want = next(g for g in gen.get_ranks(token) if rank in g)
                assert topo.ranks[name] == want, (name, rank)
        assert (topo.dp, topo.edp, topo.dp_cp) == (dp, edp, dp * cp)
        assert topo.tp_rank == topo.ranks["tp"].index(rank)


def test_single_process_topology():
    topo = Topology.build(model_cfg=cfg())
    assert (topo.world_size, topo.tp, topo.dp, topo.edp) == (1, 1, 1, 1)
    assert topo.tp_group is None and topo.dp_cp_rank == 0


def test_from_config_reads_sizes_and_keeps_options():
    topo = Topology.from_config({"name": "tp2", "tp": 2, "sequence_parallel": True, "zero1": True},
                                cfg(), 64, world_size=4, rank=3)
    assert (topo.tp, topo.dp, topo.sequence_parallel, topo.options) == (2, 2, True, {"zero1": True})
    assert not Topology.from_config({"sequence_parallel": True}, world_size=2, rank=0).sequence_parallel  # tp=1


@pytest.mark.parametrize("kwargs,model_kw,seq_len,message", [
    ({"world": 6, "tp": 4}, {}, None, r"^parallel: world size 6 is not divisible by tp\*cp\*pp=4 \(tp=4, cp=1, pp=1\)$"),
    ({"world": 8, "ep": 3}, {}, None, r"^parallel: world size 8 is not divisible by etp\*ep\*pp=3 "),
    ({"world": 8, "tp": 8}, {"num_heads": 4}, None, r"^parallel.tp=8 does not divide model.num_heads=4$"),
    ({"world": 4, "tp": 4}, {"num_kv_heads": 2}, None, r"^parallel.tp=4 does not divide model.num_kv_heads=2 "),
    ({"world": 2, "tp": 2}, {"vocab_size": 255}, None, r"^parallel.tp=2 does not divide model.vocab_size=255$"),
    ({"world": 6, "ep": 3}, {}, None, r"^parallel.ep=3 does not divide model.num_experts=8$"),
    ({"world": 6, "etp": 3}, {}, None, r"^parallel.etp=3 does not divide model.ffn_hidden_size=64$"),
    ({"world": 4, "cp": 2}, {}, 30, r"^stage.seq_len=30 is not divisible by 2\*parallel.cp=4 \(zigzag chunks\)$"),
    ({"world": 2, "tp": 2}, {}, 33, (r"^stage.seq_len=33 / parallel.cp=1 tokens per rank are not divisible by "
                                  r"parallel.tp=2$")),
    ({"world": 2, "pp": 2}, {"tie_embeddings": True}, None, r"^model.tie_embeddings=true needs parallel.pp=1"),
    ({"world": 2, "tp": 0}, {}, None, r"^parallel.tp=0 must be a positive integer$"),
    ({"world": 2, "sequence_parallel": "yes"}, {}, None, r"^parallel.sequence_parallel='yes' must be true/false$"),
])
def test_invalid_layouts(kwargs, model_kw, seq_len, message):
    with pytest.raises(ValueError, match=message):
        validate_layout(model_cfg=cfg(**model_kw), seq_len=seq_len, **kwargs)


def test_build_validates_before_creating_groups():
    with pytest.raises(ValueError, match=r"^parallel.tp=2 does not divide model.vocab_size=255$"):
        Topology.build(tp=2, model_cfg=cfg(vocab_size=255), world_size=2, rank=0)


def test_parallel_presets_validate_for_the_full_model():
    """Every conf/parallel preset (except the trainer's single.yaml) builds a valid layout of MiniMax-Text-01."""
    import math
    from pathlib import Path

    from omegaconf import OmegaConf

    from trainer.config import compose_config

    conf = Path(__file__).resolve().parent.parent / "conf"
    model = ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(conf / "model" / "minimax_text_01.yaml")))
    presets = sorted(p for p in (conf / "parallel").glob("*.yaml") if p.name != "single.yaml")
    assert presets
    for path in presets:
        preset = compose_config([f"parallel={path.stem}"]).parallel
        assert preset.name == path.stem
        world = 2 * math.lcm(preset.tp * preset.cp * preset.pp, preset.ep * preset.etp * preset.pp)
        topo = Topology.from_config(preset, model, 8192, world_size=world, rank=world - 1)
        assert topo.dp >= 2 and topo.options["router_mode"] in ("global", "local"), path.name


def _groups(rank, world):
    topo = Topology.build(tp=2, cp=1, model_cfg=cfg(), seq_len=64)
    g = topo.groups
    return {"model_and_grad_shared": g["tp_dp_cp"] is g["tp"] or g["edp"] is g["tp"] or g["dp_cp"] is g["cp"],
            "grad_groups_shared": g["tp_dp_cp"] is g["edp"], "model_groups_shared": g["tp"] is g["tp_cp"],
            "tp_rank": topo.tp_rank, "sizes": (topo.size("tp"), topo.size("edp"), topo.size("tp_dp_cp"))}


def test_grad_sync_groups_have_their_own_communicators():
    """Overlapped gradient all-reduces must not share a communicator with TP/CP/EP collectives."""
    from dist_harness import run_distributed

    for rank, got in enumerate(run_distributed(_groups, 2)):
        assert got == {"model_and_grad_shared": False, "grad_groups_shared": True, "model_groups_shared": True,
                       "tp_rank": rank, "sizes": (2, 2, 2)}

"""Our model is MiniMax's model: the same weights give HF MiniMaxForCausalLM's logits in both directions
(ours -> transformers, transformers -> ours), half rotary included (HF's proportional RoPE); the round trip is
lossless; a TP=2 x EP=2 (and TP=2 x ETP=2) model reading only its slices of an HF folder equals one
process."""

import pytest
import torch
from dist_harness import run_distributed

from model import MiniMaxForCausalLM, ModelConfig
from model.hf_convert import (
    from_hf_config,
    from_hf_files_block,
    from_hf_model,
    from_hf_state_dict,
    hf_folder_tensors,
    parameter_shapes,
    to_hf_config,
    to_hf_model,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")

VOCAB = 96
CONFIGS = {  # GQA and MHA, 2-4 layers with softmax layers, half (every preset), quarter and full rotary
    "gqa_half_rotary": {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
                        "layer_types": ["lightning", "softmax"]},
    "gqa4_half_rotary_tied": {"num_layers": 3, "num_heads": 4, "num_kv_heads": 1, "head_dim": 8,
                              "layer_types": ["softmax", "lightning", "softmax"], "tie_embeddings": True},
    "mha_full_rotary": {"num_layers": 4, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16, "rotary_dim": 16,
                        "layer_types": ["lightning", "softmax"] * 2},
    "quarter_rotary": {"num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "rotary_dim": 4,
                       "layer_types": ["lightning", "lightning", "softmax"], "deepnorm_alpha": 1.7},
    "softmax_only_half_rotary": {"num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 32,
                                 "layer_types": ["softmax", "softmax"], "rope_base": 1e7},
}


def tiny_cfg(name: str) -> ModelConfig:
    base = {"vocab_size": VOCAB, "hidden_size": 48, "num_experts": 4, "top_k": 2, "ffn_hidden_size": 40,
            "capacity_factor": None, "lightning_block_size": 8, "rope_base": 500.0}
    return ModelConfig(**{**base, **CONFIGS[name]})


def hf_logits(hf, ids_BT):
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        return hf(input_ids=ids_BT).logits.reshape(-1, VOCAB)


def our_logits(model, ids_BT):
    """The same documents packed into one sequence (HF: one document per batch row)."""
    B, T = ids_BT.shape
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    with torch.no_grad():
        return model.eval()(ids_BT.flatten(), cu).logits


def randomize_(hf, gen):
    """Weights of a trained model's scale (HF's own init gives near-zero logits, which would hide errors)."""
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:  # norms
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def assert_close(got, ref):
    assert ref.std() > 0.3  # logits far from constant: the comparison means something
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_transformers(name, gen):
    ours = MiniMaxForCausalLM(tiny_cfg(name))
    randomize_(ours, gen)
    ids = torch.randint(0, VOCAB, (2, 21), generator=gen)
    assert_close(our_logits(ours, ids), hf_logits(to_hf_model(ours).eval(), ids))


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_to_ours(name, gen):
    cfg = tiny_cfg(name)
    hf = transformers.MiniMaxForCausalLM(to_hf_config(cfg)).eval()
    randomize_(hf, gen)
    ids = torch.randint(0, VOCAB, (2, 21), generator=gen)
    ours = from_hf_model(hf)
    assert_close(our_logits(ours, ids), hf_logits(hf, ids))
    # lossless: the same config (rope base included) and bit-identical HF tensors back
    assert ours.cfg == from_hf_model(to_hf_model(ours)).cfg == cfg
    back = to_hf_state_dict(ours.state_dict(), cfg)
    for key, t in hf.state_dict().items():
        if key in back:
            assert torch.equal(back[key], t), key
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == cfg.tie_embeddings


@pytest.mark.parametrize("name", ["gqa_half_rotary", "gqa4_half_rotary_tied"])
def test_folder_tensors_are_what_transformers_writes(name, tmp_path, gen):
    """Our per-tensor conversion gives the folder transformers' save_pretrained writes, and any rectangular
    block read from it (a rank's shard; heads, experts and rows cut anywhere) equals the module's tensor's."""
    from safetensors import safe_open

    cfg = tiny_cfg(name)
    ours = MiniMaxForCausalLM(cfg)
    hf = to_hf_model(ours)
    hf.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        written = {k: f.get_tensor(k) for k in list(f.keys())}
        params = dict(ours.named_parameters())
        converted = dict(hf_folder_tensors(cfg, lambda n, _: params[n].detach()))
        assert converted.keys() == written.keys()
        for key, t in written.items():
            assert torch.equal(converted[key], t), key
        whole = from_hf_state_dict(hf.state_dict(), cfg)
        for param, shape in parameter_shapes(cfg).items():
            offsets = [int(torch.randint(0, n, (), generator=gen)) for n in shape]
            sizes = [int(torch.randint(1, n - o + 1, (), generator=gen)) for n, o in zip(shape, offsets)]
            block = from_hf_files_block(param, cfg, offsets, sizes, f.get_slice)
            box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            assert torch.equal(block, whole[param][box]), (param, offsets, sizes)


def test_unexpressible_configs_are_refused():
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        to_hf_config(ModelConfig(num_heads=2, head_dim=44, num_kv_heads=1, rotary_dim=30))
    with pytest.raises(ValueError, match="lightning_norm_eps"):
        to_hf_config(ModelConfig(lightning_norm_eps=1e-5))
    with pytest.raises(ValueError, match="rotary_dim=64 with default RoPE"):  # not imported as full rotation
        from_hf_config(transformers.MiniMaxConfig(head_dim=128, rotary_dim=64))


def _sharded_logits(rank, world, hf_dir, cfg, ids):
    from parallel.hf_load import load_hf_weights
    from parallel.topology import Topology
    from trainer.layout import build_model

    out = []
    for layout in ({"tp": 2, "ep": 2, "sequence_parallel": True}, {"tp": 2, "etp": 2}):
        topo = Topology.build(model_cfg=cfg, seq_len=ids.numel(), **layout)
        model = build_model(cfg, topo, torch.device("cpu"), seed=5, recompute=False)
        load_hf_weights(model, hf_dir)
        out.append(our_logits(model, ids.view(1, -1)))
    return out


def test_sharded_load_reads_each_ranks_slices(tmp_path, gen):
    cfg = tiny_cfg("gqa_half_rotary")  # 4 heads, 2 KV heads: one per TP rank
    hf = transformers.MiniMaxForCausalLM(to_hf_config(cfg)).eval()
    randomize_(hf, gen)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")  # several files and an index
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, VOCAB, (32,), generator=gen)
    ref = our_logits(from_hf_model(hf), ids.view(1, -1))
    for rank_logits in run_distributed(_sharded_logits, 2, str(tmp_path), cfg, ids):
        for got in rank_logits:
            assert (got - ref).abs().max().item() <= 1e-5

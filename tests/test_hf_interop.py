"""Our model is MiniMax's model: same weights and tokens give HF MiniMaxForCausalLM's logits; lossless round trip."""

import pytest
import torch

from model import MiniMaxForCausalLM, ModelConfig
from model.hf_convert import from_hf_model, to_hf_model

transformers = pytest.importorskip("transformers")


def tiny_cfg(**kw):
    base = {"vocab_size": 97, "hidden_size": 48, "num_layers": 4, "num_heads": 4, "head_dim": 16, "num_kv_heads": 2,
                "softmax_period": 2, "rotary_dim": 16, "num_experts": 4, "top_k": 2, "ffn_hidden_size": 40,
                "capacity_factor": None, "lightning_block_size": 8, "rope_base": 500.0}
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("lengths", [[37], [21, 21]])
def test_logits_match_hf(lengths):
    torch.manual_seed(0)
    ours = MiniMaxForCausalLM(tiny_cfg()).eval()
    hf = to_hf_model(ours).eval()
    hf.config._attn_implementation = "eager"
    ids = torch.randint(0, 97, (len(lengths), lengths[0]))  # HF: one document per batch row
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.reshape(-1, 97)
        got = ours(ids.flatten(), cu).logits
    assert (got - ref).abs().max().item() <= 1e-4


def test_round_trip_is_lossless():
    torch.manual_seed(1)
    ours = MiniMaxForCausalLM(tiny_cfg(deepnorm_alpha=1.7))
    back = from_hf_model(to_hf_model(ours))
    assert back.cfg.layer_types == ours.cfg.layer_types and back.cfg.deepnorm_alpha == 1.7
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hf1 = to_hf_model(ours).state_dict()
    hf2 = to_hf_model(back).state_dict()
    for k in hf1:
        assert torch.equal(hf1[k], hf2[k]), k


def test_half_rotary_is_refused_for_hf():
    with pytest.raises(ValueError, match="rotary_dim"):
        to_hf_model(MiniMaxForCausalLM(tiny_cfg(rotary_dim=8)))

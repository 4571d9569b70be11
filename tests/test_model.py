"""The plain model: packing isolation, MoE routing/drop/aux loss by hand, presets and parameter counts."""

import math

import pytest
import torch
import yaml
from conftest import cu_from_lengths

from model import MiniMaxForCausalLM, ModelConfig
from model.moe import MoE, capacity_keep_mask, expert_capacity, route_top_k, switch_aux_loss


def small_cfg(**kw):
    base = {"vocab_size": 61, "hidden_size": 32, "num_layers": 4, "num_heads": 2, "head_dim": 16, "num_kv_heads": 1,
                "softmax_period": 2, "num_experts": 4, "top_k": 2, "ffn_hidden_size": 24, "capacity_factor": None,
                "lightning_block_size": 8}
    base.update(kw)
    return ModelConfig(**base)


def test_packed_documents_equal_documents_alone():
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(small_cfg()).double().eval()
    lengths = [1, 13, 8, 30]
    docs = [torch.randint(0, 61, (n,)) for n in lengths]
    cu = cu_from_lengths(lengths)
    with torch.no_grad():
        packed = model(torch.cat(docs), cu).logits
    with torch.inference_mode():  # also: the host cu_seqlens cache and slope cache work on inference tensors
        alone = torch.cat([model(d, torch.tensor([0, len(d)], dtype=torch.int32)).logits for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)


def test_layer_types_and_slopes_follow_minimax():
    cfg = small_cfg(num_layers=16, softmax_period=8, num_heads=4)
    assert [i for i, t in enumerate(cfg.layer_types) if t == "softmax"] == [7, 15]
    s = cfg.lightning_slopes(3)
    expected = [2 ** (-8 * (h + 1) / 4) * (1 - 3 / (15 + 1e-5) + 1e-5) for h in range(4)]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64))


def test_capacity_formula():
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 2, 4, 1.25) == math.ceil(6.25)


def test_drop_ties_keep_earlier_tokens():
    keep = capacity_keep_mask(torch.tensor([[0], [0], [0]]), torch.tensor([[0.5], [0.5], [0.5]]), torch.tensor([2]))
    assert keep.flatten().tolist() == [True, True, False]


def test_drop_keeps_highest_gates():
    # expert 0 receives 5 assignments, capacity 2: gates 0.6, 0.9, 0.55, 0.9, 0.7 -> keep tokens 1 and 3.
    expert_idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [0, 2]])
    gates = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.55, 0.45], [0.9, 0.1], [0.7, 0.3]])
    keep = capacity_keep_mask(expert_idx, gates, torch.tensor([2, 1, 1, 5]))
    # expert 0 (cap 2) keeps tokens 1, 3 (0.9, 0.9); expert 1 (cap 1) keeps token 2 (0.45 > 0.4);
    # expert 2 (cap 1) keeps token 4 (0.3 > 0.1); expert 3 keeps its only assignment.
    expected = torch.tensor([[False, False], [True, False], [False, True], [True, True], [False, True]])
    assert torch.equal(keep, expected)


def test_route_top_k_gates_are_softmax_of_chosen_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    r = route_top_k(logits, 2)
    assert r.expert_idx.tolist() == [[1, 2]]
    e = math.exp(1.0)
    torch.testing.assert_close(r.gates, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    assert r.tokens_per_expert.tolist() == [0, 1, 1, 0]


def test_switch_aux_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    tokens_per_expert = torch.tensor([1, 2, 1])  # top-2 of 2 tokens = 4 assignments
    # f = [1/4, 2/4, 1/4]; P = [0.4, 0.4, 0.2]; E * sum f P = 3 * (0.1 + 0.2 + 0.05) = 1.05
    got = switch_aux_loss(probs, tokens_per_expert, num_tokens=2, top_k=2, coef=0.01)
    torch.testing.assert_close(got, torch.tensor(0.0105))


def test_moe_output_matches_per_token_computation_with_drops():
    torch.manual_seed(0)
    cfg = small_cfg(capacity_factor=0.5)
    moe = MoE(cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(12, 32, dtype=torch.float64)
    y = moe(x)
    routing = route_top_k(moe.gate(x).double(), 2)
    cap = torch.full((4,), expert_capacity(12, 2, 4, 0.5))
    keep = capacity_keep_mask(routing.expert_idx, routing.gates, cap)
    w = moe.experts
    expected = torch.zeros_like(x)
    for t in range(12):
        for j in range(2):
            if keep[t, j]:
                e = routing.expert_idx[t, j]
                h = torch.nn.functional.silu(x[t] @ w.w_gate[e]) * (x[t] @ w.w_up[e])
                expected[t] += routing.gates[t, j] * (h @ w.w_down[e])
    torch.testing.assert_close(y, expected)
    assert int(moe.last_stats["dropped"]) == int((~keep).sum()) > 0
    assert moe.last_stats["routed"] == 24


def test_aux_loss_reaches_router():
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(small_cfg())
    ids = torch.randint(0, 61, (20,))
    out = model(ids, torch.tensor([0, 20], dtype=torch.int32))
    out.aux_loss.backward()
    assert model.layers["0"].mlp.gate.weight.grad.abs().sum() > 0


def test_full_preset_parameter_counts():
    with open("conf/model/minimax_text_01.yaml") as f:
        cfg = ModelConfig.from_dict(yaml.safe_load(f))
    with torch.device("meta"):
        counts = MiniMaxForCausalLM(cfg).parameter_counts()
    assert abs(counts["total"] / 456e9 - 1) < 0.005
    assert abs(counts["active"] / 45.9e9 - 1) < 0.005


@pytest.mark.parametrize("bad,msg", [
    ({"num_heads": 3, "num_kv_heads": 2}, "num_kv_heads"),
    ({"top_k": 9}, "top_k"),
    ({"layer_types": ["lightning"] * 3}, "layer_types"),
    ({"rotary_dim": 7}, "rotary_dim"),
])
def test_bad_model_config_names_the_setting(bad, msg):
    with pytest.raises(ValueError, match=msg):
        small_cfg(**bad)


def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_dict({"hidden": 3})


def test_recompute_gives_the_same_gradients(monkeypatch):
    from model import transformer

    torch.manual_seed(0)
    ids = torch.randint(0, 61, (24,))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    grads, checkpointed = [], []
    monkeypatch.setattr(transformer, "checkpoint",
                        lambda *a, **kw: checkpointed.append(1) or torch.utils.checkpoint.checkpoint(*a, **kw))
    for recompute in (False, True):
        torch.manual_seed(1)
        model = MiniMaxForCausalLM(small_cfg(capacity_factor=1.0), recompute=recompute).double()
        out = model(ids, cu, labels=ids.roll(-1))
        (out.loss + out.aux_loss).backward()
        grads.append([p.grad for p in model.parameters()])
        assert len(checkpointed) == (4 if recompute else 0)  # every decoder layer, only when asked
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

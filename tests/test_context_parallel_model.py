"""The whole model under context parallelism (gloo) equals the single-process model on the full window:
logits, loss, aux loss and every gradient (replicated parameters: summed over CP). The MoE is converted the
way `parallelize` converts it for cp > 1 (group routing over the CP ranks)."""

import copy

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_distributed

from model.config import ModelConfig
from model.transformer import MiniMaxForCausalLM
from parallel.attention_parallel import ContextParallel, parallelize_attention
from parallel.tensor_parallel import TensorParallelMoE
from parallel.zigzag import shard_batch

T = 32
CASES = {
    "crossing": [0, 5, 19, 32],
    "chunk_edge": [0, 8, 12, 24, 32],
    "many_short": [0, 1, 3, 4, 7, 9, 10, 14, 15, 18, 21, 22, 25, 27, 28, 31, 32],
    "one_document": [0, 32],
    "two_windows": [0, 5, 19, 32, 40, 64],
}


def _config():
    # a lightning and a softmax layer (GQA), MoE per token (no capacity), tiny sizes
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, num_kv_heads=1,
                       layer_types=["lightning", "softmax"], num_experts=4, top_k=2, ffn_hidden_size=32,
                       capacity_factor=None, lightning_block_size=4)


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _model_vs_full(rank, cp, lasp_mode):
    group = dist.group.WORLD
    torch.manual_seed(0)
    reference = MiniMaxForCausalLM(_config())
    cp_model = copy.deepcopy(reference)
    layout = ContextParallel.for_window(group, T, lasp_mode)
    for layer in cp_model.layers.values():  # as `parallelize` does for cp > 1, tp = 1: whole-window aux loss
        parallelize_attention(layer.self_attn, None, False, layout)
        TensorParallelMoE.convert(layer.mlp, None, False, token_group=group)
    results = {}
    for name, cu in CASES.items():
        cu = torch.tensor(cu)
        n = int(cu[-1])
        gen = torch.Generator().manual_seed(len(name))
        ids = torch.randint(0, 64, (n,), generator=gen)
        labels = torch.randint(0, 64, (n,), generator=gen)
        labels[torch.rand(n, generator=gen) < 0.2] = -100
        # single process, full micro-batch
        reference.zero_grad()
        out = reference(ids, cu, labels)
        (out.loss + out.aux_loss).backward()
        with torch.no_grad():
            logits_full = reference(ids, cu).logits
        # context parallel: every rank its zigzag tokens
        local = shard_batch({"input_ids": ids, "labels": labels, "cu_seqlens": cu}, T, rank, cp)
        idx = shard_batch({"input_ids": torch.arange(n), "cu_seqlens": cu}, T, rank, cp)["input_ids"]
        cp_model.zero_grad()
        out_cp = cp_model(local["input_ids"], local["cu_seqlens"], local["labels"], positions=local["positions"])
        (out_cp.loss_sum / local["num_tokens"] + out_cp.aux_loss).backward()
        loss_sum = out_cp.loss_sum.detach().clone()
        dist.all_reduce(loss_sum)
        errors = {"loss": _rel_err(loss_sum / local["num_tokens"], out.loss.detach()),
                  "aux": _rel_err(out_cp.aux_loss.detach(), out.aux_loss.detach())}
        with torch.no_grad():
            logits = cp_model(local["input_ids"], local["cu_seqlens"], positions=local["positions"]).logits
        errors["logits"] = _rel_err(logits, logits_full[idx])
        ref_grads = dict(reference.named_parameters())
        for pname, p in cp_model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)  # replicated parameters: gradients summed over CP
            errors[pname] = _rel_err(grad, ref_grads[pname].grad)
        results[name] = errors
    return results


@pytest.mark.parametrize("cp, lasp_mode", [(2, "allgather"), (4, "ring")])
def test_model_matches_full_window(cp, lasp_mode):
    for rank in run_distributed(_model_vs_full, cp, lasp_mode):
        for name, errors in rank.items():
            worst = max(errors, key=errors.get)
            assert errors[worst] < 1e-5, (cp, name, worst, errors[worst])

"""Incremental decoding of `MiniMaxForCausalLM`: one full forward over the prompt (prefill), then one token at a
time, with greedy or temperature + nucleus (top-p) sampling.

Per layer the cache holds what the next token needs:
- lightning layers: the decayed state S [H, d_k, d_v] (fp32) of S_t = lambda_h * S_{t-1} + k_t^T v_t, so a
  token costs O(1) whatever the length; the prefill takes it from the kernel's final state, a decode step
  applies the recurrence once.
- softmax layers: the keys (RoPE applied at their absolute positions) and values of every token so far, at the
  kv heads' width (GQA).

MoE layers decode without capacity drop: every token keeps its top-k experts, whatever the config's
capacity_factor (capacity is a training-time device; at inference it would make a token's output depend on the
other tokens in the batch). A full forward matches these logits when built with capacity_factor=None.

Plain PyTorch on one device, no process groups; one prompt is one document.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.lightning_attention import lightning_attention
from kernels.softmax_attention import softmax_attention_varlen

from .attention import LightningAttention
from .moe import route_top_k
from .rope import apply_rope, rope_cos_sin


@dataclass
class DecodeCache:
    position: int = 0  # tokens seen so far: the absolute position of the next token
    layers: dict = field(default_factory=dict)  # layer key -> lightning state, or softmax (keys, values)


def _lightning(attn, x, state):
    """LightningAttention.forward continued from `state` (None: the start of the document)."""
    T = x.shape[0]
    qkv = F.silu(attn.qkv_proj(x)).view(T, -1, 3 * attn.head_dim)
    q, k, v = qkv.split(attn.head_dim, dim=-1)
    slopes = attn.slopes(x.device)
    if T == 1:  # the recurrent form, in fp32 (or wider) like the kernels' state
        ct = torch.promote_types(q.dtype, torch.float32)
        q1, k1, v1 = q[0].to(ct), k[0].to(ct), v[0].to(ct)
        kv = k1[:, :, None] * v1[:, None, :]  # k^T v per head [H, d_k, d_v]
        state = kv if state is None else torch.exp(-slopes.to(ct))[:, None, None] * state + kv
        o = torch.einsum("hk,hkv->hv", q1, state)[None].to(q.dtype)
    else:
        initial = None if state is None else state[None]
        o, final = lightning_attention(q, k, v, slopes, initial_state=initial, output_final_state=True,
                                       block_size=attn.block_size)
        state = final[0]
    o = torch.sigmoid(attn.output_gate(x)) * attn.norm(o.reshape(T, -1))
    return attn.out_proj(o), state


def _softmax(attn, x, kv, position):
    """SoftmaxAttention.forward for tokens at positions position.. that also attend to the cached (keys, values)."""
    T = x.shape[0]
    q = attn.q_proj(x).view(T, -1, attn.head_dim)
    k = attn.k_proj(x).view(T, -1, attn.head_dim)
    v = attn.v_proj(x).view(T, -1, attn.head_dim)
    positions = torch.arange(position, position + T, device=x.device)
    cos, sin = rope_cos_sin(positions, attn.rotary_dim, attn.rope_base, q.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv is not None:  # grows by concatenation: O(length) per token, as the attention itself
        k, v = torch.cat([kv[0], k]), torch.cat([kv[1], v])
    # Bottom-right causal alignment: the new queries are the last T positions of the key sequence.
    cu_q = torch.tensor([0, T], dtype=torch.int32)
    cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32)
    o, _ = softmax_attention_varlen(q, k, v, cu_q, scale=attn.head_dim ** -0.5, causal=True, cu_seqlens_k=cu_k)
    return attn.o_proj(o.reshape(T, -1)), (k, v)


def _moe_without_drop(moe, x):
    """MoE.forward with no capacity: every token keeps its top-k experts."""
    routing = route_top_k(moe.gate(x), moe.top_k)
    token_idx = torch.arange(x.shape[0], device=x.device).repeat_interleave(moe.top_k)
    return moe.experts_forward(x, token_idx, routing.expert_idx.flatten(), routing.gates.flatten())


@torch.inference_mode()
def extend(model, input_ids: torch.Tensor, cache: DecodeCache) -> tuple[torch.Tensor, DecodeCache]:
    """Run tokens input_ids [T] that follow the cached ones; returns their logits [T, V] and the cache
    (updated in place)."""
    x = model.embed_tokens(input_ids)
    for key, layer in model.layers.items():
        h = layer.input_layernorm(x)
        if isinstance(layer.self_attn, LightningAttention):
            mixed, cache.layers[key] = _lightning(layer.self_attn, h, cache.layers.get(key))
        else:
            mixed, cache.layers[key] = _softmax(layer.self_attn, h, cache.layers.get(key), cache.position)
        x = layer.alpha * h + layer.beta * mixed
        h = layer.post_attention_layernorm(x)
        x = layer.alpha * h + layer.beta * _moe_without_drop(layer.mlp, h)
    cache.position += input_ids.shape[0]
    return model.lm_head(model.norm(x)), cache


def prefill(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, DecodeCache]:
    """The prompt [T] in one forward: its logits [T, V] and the cache after it."""
    return extend(model, input_ids, DecodeCache())


def decode_step(model, token: torch.Tensor, cache: DecodeCache) -> tuple[torch.Tensor, DecodeCache]:
    """One token (a 0-d or [1] tensor) after the cache: its logits [V] and the updated cache."""
    logits, cache = extend(model, token.reshape(1), cache)
    return logits[0], cache


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling distribution [V] from logits [V]: softmax(logits / temperature) restricted to the nucleus, the
    fewest most likely tokens whose probability reaches top_p (at least the most likely one), renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the tokens before it already reach top_p
    outside[0] = False
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs / sorted_probs.sum())


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Greedy (argmax) when temperature == 0, else a sample from the nucleus; returns a [1] tensor."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(nucleus_probs(logits, temperature, top_p), 1, generator=generator)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, eos_id: int | None = None) -> torch.Tensor:
    """Up to max_new_tokens ids [N] following the prompt input_ids [T] (T >= 1); stops after eos_id."""
    model.eval()
    logits, cache = prefill(model, input_ids)
    logits = logits[-1]
    new = []
    for _ in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)
        new.append(token)
        if len(new) == max_new_tokens or (eos_id is not None and token.item() == eos_id):
            break
        logits, cache = decode_step(model, token, cache)
    return torch.cat(new) if new else input_ids.new_zeros(0)

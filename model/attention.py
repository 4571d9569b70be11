"""The two token mixers of the hybrid: lightning (linear) attention and GQA softmax attention with partial RoPE.

Both take packed tokens x [T, hidden] with document boundaries `cu_seqlens` and never mix documents.
Parameter names follow HF's MiniMaxForCausalLM so conversion is a rename-free copy.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kernels.lightning_attention import lightning_attention
from kernels.softmax_attention import softmax_attention_varlen

from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope, rope_cos_sin


class LightningAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.block_size = cfg.lightning_block_size
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.q_dim, bias=False)
        self.output_gate = nn.Linear(cfg.hidden_size, cfg.q_dim, bias=False)
        self.out_proj = nn.Linear(cfg.q_dim, cfg.hidden_size, bias=False)
        self.norm = RMSNorm(cfg.q_dim, eps=cfg.lightning_norm_eps)
        # Slopes are a function of the config, not state (kept out of checkpoints); one fp32 copy per device.
        self._slopes = cfg.lightning_slopes(layer_idx)
        self._slopes_on: dict = {}

    def slopes(self, device) -> torch.Tensor:
        if device not in self._slopes_on:
            with torch.inference_mode(False):  # a copy made under inference mode could not be saved for backward
                self._slopes_on[device] = self._slopes.to(device=device, dtype=torch.float32)
        return self._slopes_on[device]

    def mix(self, q, k, v, cu_seqlens, positions):
        """The sequence-mixing core on [T, H, d]; parallel/ swaps this for LASP+ under context parallelism."""
        o, _ = lightning_attention(q, k, v, self.slopes(q.device), cu_seqlens=cu_seqlens,
                                   block_size=self.block_size)
        return o

    def forward(self, x, cu_seqlens, positions):
        T = x.shape[0]
        qkv = F.silu(self.qkv_proj(x)).view(T, -1, 3 * self.head_dim)  # head-major: [q_h | k_h | v_h] per head
        q, k, v = qkv.split(self.head_dim, dim=-1)
        o = self.mix(q, k, v, cu_seqlens, positions).reshape(T, -1)
        o = torch.sigmoid(self.output_gate(x)) * self.norm(o)
        return self.out_proj(o)


class SoftmaxAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim, self.rotary_dim, self.rope_base = cfg.head_dim, cfg.rotary_dim, cfg.rope_base
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.hidden_size, bias=False)

    def mix(self, q, k, v, cu_seqlens, positions):
        """Causal attention within documents on [T, H, d]; parallel/ swaps this for ring attention."""
        o, _ = softmax_attention_varlen(q, k, v, cu_seqlens, scale=self.head_dim ** -0.5, causal=True)
        return o

    def forward(self, x, cu_seqlens, positions):
        T = x.shape[0]
        q = self.q_proj(x).view(T, -1, self.head_dim)
        k = self.k_proj(x).view(T, -1, self.head_dim)
        v = self.v_proj(x).view(T, -1, self.head_dim)
        cos, sin = rope_cos_sin(positions, self.rotary_dim, self.rope_base, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(self.mix(q, k, v, cu_seqlens, positions).reshape(T, -1))

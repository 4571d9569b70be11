"""The MiniMax-01 hybrid decoder: embedding, DeepNorm decoder layers (lightning or softmax mixer + MoE), LM head."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import LightningAttention, SoftmaxAttention
from .config import ModelConfig
from .init import init_block_
from .linear_cross_entropy import linear_cross_entropy
from .moe import MoE
from .norm import RMSNorm
from .rope import positions_from_cu_seqlens


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [T, V], only when no labels were given
    loss_sum: torch.Tensor | None  # fp32 sum of token cross-entropies over labels != -100
    num_tokens: torch.Tensor | None  # number of labels != -100
    aux_loss: torch.Tensor  # MoE load-balancing loss, coefficient applied, summed over layers
    moe_dropped: torch.Tensor  # token-expert assignments dropped by capacity (all layers)
    moe_routed: int  # token-expert assignments routed (all layers)
    tokens_per_expert: torch.Tensor  # [L, E] routed demand per layer and expert

    @property
    def loss(self) -> torch.Tensor:
        return self.loss_sum / self.num_tokens.clamp(min=1)


class DecoderLayer(nn.Module):
    """MiniMax's DeepNorm form (matches HF): h = Norm(x); x = alpha * h + beta * Sublayer(h), twice."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        mixer = SoftmaxAttention if cfg.layer_is_softmax(layer_idx) else LightningAttention
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = mixer(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg)
        self.alpha, self.beta = cfg.deepnorm_alpha, cfg.deepnorm_beta

    def forward(self, x, cu_seqlens, positions):
        h = self.input_layernorm(x)
        x = self.alpha * h + self.beta * self.self_attn(h, cu_seqlens, positions)
        h = self.post_attention_layernorm(x)
        return self.alpha * h + self.beta * self.mlp(h)


class MiniMaxForCausalLM(nn.Module):
    """`layers` is keyed by the global layer index: a pipeline stage keeps only its own layers (and the first
    stage the embedding, the last the norm and head; the others are None) under the same parameter names."""

    def __init__(self, cfg: ModelConfig, recompute: bool = False, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.recompute = recompute  # activation checkpointing per decoder layer
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int = 0):
        """The logical initialisation of `model.init` (the same weights a parallel layout's shards hold)."""
        for name, p in self.named_parameters():
            init_block_(p.data, self.cfg, name, tuple(p.shape), (0,) * p.ndim, seed)

    def run_layers(self, x, cu_seqlens, positions, layers):
        for layer in layers:
            if self.recompute and self.training:
                x = checkpoint(layer, x, cu_seqlens, positions, use_reentrant=False)
            else:
                x = layer(x, cu_seqlens, positions)
        return x

    def hidden_states(self, input_ids, cu_seqlens, positions=None):
        if positions is None:
            positions = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0])
        x = self.run_layers(self.embed_tokens(input_ids), cu_seqlens, positions, self.layers.values())
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, labels: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [T] packed tokens; cu_seqlens [N+1] document boundaries; labels [T] with -100 = ignore."""
        h = self.hidden_states(input_ids, cu_seqlens, positions)
        stats = [layer.mlp.last_stats for layer in self.layers.values()]
        out = ModelOutput(
            logits=None, loss_sum=None, num_tokens=None,
            aux_loss=sum(s["aux_loss"] for s in stats),
            moe_dropped=sum(s["dropped"] for s in stats),
            moe_routed=sum(s["routed"] for s in stats),
            tokens_per_expert=torch.stack([s["tokens_per_expert"] for s in stats]),
        )
        if labels is None:
            out.logits = self.lm_head(h)
        else:
            out.loss_sum = self.head_loss_sum(h, labels)
            out.num_tokens = (labels != -100).sum()
        return out

    def head_loss_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """fp32 sum of the LM head's token cross-entropies, without logits [T, V]."""
        return linear_cross_entropy(h, self.lm_head.weight, labels)

    def parameter_counts(self) -> dict:
        """Total, active-per-token (experts scaled by top_k / E) and embedding parameter counts."""
        embedding = self.embed_tokens.weight.numel() + (0 if self.cfg.tie_embeddings
                                                        else self.lm_head.weight.numel())
        expert = sum(p.numel() for n, p in self.named_parameters() if ".experts." in n)
        total = sum(p.numel() for p in self.parameters())
        active = total - embedding - expert + expert * self.cfg.top_k // self.cfg.num_experts
        return {"total": total, "active": active, "embedding": embedding, "expert": expert}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward).

        Matrix products: 2 x active non-embedding params + 2 x lm_head per token forward. Softmax attention,
        causal: QK^T and PV over seq_len/2 keys on average = 2 * 2 * (S/2) * H * d. Lightning attention: the
        recurrent cost o = q S and S += k^T v, 2 * 2 * d^2 per head.
        """
        c = self.cfg
        dense = 2 * (self.parameter_counts()["active"] + c.vocab_size * c.hidden_size)
        n_soft = sum(c.layer_is_softmax(i) for i in range(c.num_layers))
        attn = n_soft * 2 * seq_len * c.num_heads * c.head_dim
        attn += (c.num_layers - n_soft) * 4 * c.num_heads * c.head_dim ** 2
        return 3.0 * (dense + attn)

"""Model configuration: one dataclass shared by the plain model, the parallel layer and the HF converter."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 8
    num_heads: int = 4
    head_dim: int = 16
    num_kv_heads: int = 2
    # layer i uses softmax attention when i % softmax_period == softmax_period - 1 (0: never)
    softmax_period: int = 8
    layer_types: list[str] | None = None  # explicit "lightning"/"softmax" per layer overrides softmax_period
    rotary_dim: int | None = None  # None: head_dim // 2 (MiniMax rotates the first half of each head)
    rope_base: float = 10_000.0
    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: int = 128
    capacity_factor: float | None = None  # None: no token drop
    aux_loss_coef: float = 0.01
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6  # MiniMax's RMSNorm over all heads uses its default eps
    lightning_block_size: int = 64
    # DeepNorm: alpha = (2N)^0.25 scales the (normalised) residual branch; beta scales the sublayer output
    deepnorm_alpha: float | None = None
    deepnorm_beta: float = 1.0
    tie_embeddings: bool = False
    init_std: float = 0.02  # embedding init
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. preset name); ignored by the model

    def __post_init__(self):
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim // 2
        if self.deepnorm_alpha is None:
            self.deepnorm_alpha = (2 * self.num_layers) ** 0.25
        if self.layer_types is None:
            p = self.softmax_period
            self.layer_types = [
                "softmax" if p > 0 and i % p == p - 1 else "lightning" for i in range(self.num_layers)
            ]
        self.layer_types = list(self.layer_types)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"model config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "num_kv_heads",
                     "num_experts", "top_k", "ffn_hidden_size", "lightning_block_size"):
            need(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        need(len(self.layer_types) == self.num_layers,
             f"model.layer_types has {len(self.layer_types)} entries, model.num_layers={self.num_layers}")
        bad = sorted(set(self.layer_types) - {"lightning", "softmax"})
        need(not bad, f"model.layer_types has unknown kinds {bad}; use 'lightning' or 'softmax'")
        need(self.num_heads % self.num_kv_heads == 0,
             f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}")
        need(self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
             f"model.rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        need(self.top_k <= self.num_experts,
             f"model.top_k={self.top_k} exceeds model.num_experts={self.num_experts}")
        need(self.capacity_factor is None or self.capacity_factor > 0,
             f"model.capacity_factor={self.capacity_factor} must be positive or null")

    @classmethod
    def from_dict(cls, d) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def layer_is_softmax(self, i: int) -> bool:
        return self.layer_types[i] == "softmax"

    def lightning_slopes(self, layer: int):
        """Per-head decay rate s_h of lightning layer `layer` (HF's form); lambda_h = exp(-s_h)."""
        import torch

        h = torch.arange(self.num_heads, dtype=torch.float64, device="cpu") + 1  # also under a meta device
        base = 2.0 ** (-8.0 * h / self.num_heads)
        factor = 1 - layer / (self.num_layers - 1 + 1e-5) + 1e-5
        return base * factor

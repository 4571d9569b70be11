"""Conversion to and from Hugging Face `transformers`' MiniMaxForCausalLM (the `hf` extra).

Our parameter names mirror HF's except the experts, which we store as separate [E, in, out] matrices for
grouped products; HF stores gate and up fused as [E, 2*ffn, hidden] and down as [E, hidden, ffn].
"""

import torch

from .config import ModelConfig

_LAYER_TYPES = {"lightning": "linear_attention", "softmax": "full_attention"}


def to_hf_config(cfg: ModelConfig):
    from transformers import MiniMaxConfig

    if cfg.rotary_dim != cfg.head_dim:
        # transformers' MiniMax port rotates every channel of the head; it cannot express MiniMax's half rotation.
        raise ValueError(f"model.rotary_dim={cfg.rotary_dim}: HF MiniMaxForCausalLM only supports "
                         f"rotary_dim == head_dim ({cfg.head_dim})")
    return MiniMaxConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, layer_types=[_LAYER_TYPES[t] for t in cfg.layer_types],
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        block_size=cfg.lightning_block_size, tie_word_embeddings=cfg.tie_embeddings,
        router_aux_loss_coef=cfg.aux_loss_coef,
        full_attn_alpha_factor=cfg.deepnorm_alpha, linear_attn_alpha_factor=cfg.deepnorm_alpha,
        mlp_alpha_factor=cfg.deepnorm_alpha, full_attn_beta_factor=cfg.deepnorm_beta,
        linear_attn_beta_factor=cfg.deepnorm_beta, mlp_beta_factor=cfg.deepnorm_beta,
    )


def from_hf_config(hf) -> ModelConfig:
    alphas = {hf.full_attn_alpha_factor, hf.linear_attn_alpha_factor, hf.mlp_alpha_factor}
    betas = {hf.full_attn_beta_factor, hf.linear_attn_beta_factor, hf.mlp_beta_factor}
    if len(alphas) != 1 or len(betas) != 1:
        raise ValueError(f"HF config: per-sublayer DeepNorm factors differ (alpha {alphas}, beta {betas}); "
                         "this model uses one alpha and one beta")
    back = {v: k for k, v in _LAYER_TYPES.items()}
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta", 1e6)}
    return ModelConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, head_dim=head_dim, num_kv_heads=hf.num_key_value_heads,
        layer_types=[back[t] for t in hf.layer_types], rotary_dim=head_dim, rope_base=rope["rope_theta"],
        num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, ffn_hidden_size=hf.intermediate_size,
        capacity_factor=None, aux_loss_coef=hf.router_aux_loss_coef, rms_norm_eps=hf.rms_norm_eps,
        lightning_block_size=hf.block_size, deepnorm_alpha=alphas.pop(), deepnorm_beta=betas.pop(),
        tie_embeddings=hf.tie_word_embeddings,
    )


def to_hf_state_dict(state: dict) -> dict:
    out = {}
    for name, t in state.items():
        if ".mlp.experts.w_gate" in name:
            prefix = name.removesuffix("w_gate")
            up = state[prefix + "w_up"]
            out["model." + prefix + "gate_up_proj"] = torch.cat([t.transpose(1, 2), up.transpose(1, 2)], dim=1)
        elif ".mlp.experts.w_down" in name:
            out["model." + name.removesuffix("w_down") + "down_proj"] = t.transpose(1, 2)
        elif ".mlp.experts.w_up" in name:
            continue
        elif name.startswith("lm_head."):
            out[name] = t
        else:
            out["model." + name] = t
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf_state: dict) -> dict:
    out = {}
    for name, t in hf_state.items():
        if name.endswith(("slope_rate", "query_decay", "key_decay", "diagonal_decay", "inv_freq")):
            continue  # HF's precomputed buffers; we derive them from the config
        name = name.removeprefix("model.")
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            gate, up = t.chunk(2, dim=1)
            out[prefix + "w_gate"], out[prefix + "w_up"] = gate.transpose(1, 2), up.transpose(1, 2)
        elif name.endswith("experts.down_proj"):
            out[name.removesuffix("down_proj") + "w_down"] = t.transpose(1, 2)
        else:
            out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_model(model):
    """Our MiniMaxForCausalLM -> transformers.MiniMaxForCausalLM with the same weights."""
    from transformers import MiniMaxForCausalLM as HFModel

    hf = HFModel(to_hf_config(model.cfg)).to(next(model.parameters()).dtype)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    missing = [k for k in missing if not k.endswith(("slope_rate", "query_decay", "key_decay", "diagonal_decay"))]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion mismatch: missing {missing}, unexpected {unexpected}")
    return hf


def from_hf_model(hf):
    """transformers.MiniMaxForCausalLM -> our MiniMaxForCausalLM with the same weights."""
    from .transformer import MiniMaxForCausalLM

    cfg = from_hf_config(hf.config)
    with torch.device("meta"):
        model = MiniMaxForCausalLM(cfg)
    model.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True, assign=True)
    return model

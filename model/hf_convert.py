"""Conversion to and from Hugging Face `transformers`' MiniMaxForCausalLM (the `hf` extra).

Our parameter names mirror HF's except the experts, which we store as [E, in, out] matrices for grouped
products. transformers' module fuses them: gate and up as [E, 2*ffn, hidden], down as [E, hidden, ffn].
Its folders (what `save_pretrained` writes and the Hub's checkpoints hold; it fuses them on loading) keep
Mixtral's per-expert w1 (gate), w3 (up) [ffn, hidden] and w2 (down) [hidden, ffn], and the router under
`block_sparse_moe`.

Partial RoPE. We rotate the first rotary_dim channels of each head, pairing channel j with j + rotary_dim/2
at frequency base^(-2j/rotary_dim). HF's "proportional" RoPE with partial_rotary_factor = rotary_dim/head_dim
pairs j with j + head_dim/2 at theta^(-2j/head_dim) for j < rotary_dim/2 and gives the other pairs frequency 0
(cos 1, sin 0: passed through unchanged). So theta = base^(head_dim/rotary_dim) gives our frequencies, and
ordering each q/k head's channels [A | pass[:n] | B | pass[n:]] (A, B the halves of our rotated channels,
n = (head_dim - rotary_dim)/2) puts every pair where HF rotates it; q.k is unchanged when q and k are
permuted alike. Full rotation (rotary_dim == head_dim) is HF's default RoPE with our base.

Modules: `to_hf_state_dict`, `from_hf_state_dict`, `to_hf_model`, `from_hf_model`. Folders: written one tensor
at a time (`hf_file_tensors`) and read one block at a time (`from_hf_files_block`), so an export or a sharded
load never holds more than one tensor (`trainer.export`, `parallel.hf_load`).
"""

from dataclasses import replace

import torch

from .config import ModelConfig

_LAYER_TYPES = {"lightning": "linear_attention", "softmax": "full_attention"}
_ROPE_ROWS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")
_HF_LIGHTNING_NORM_EPS = 1e-6  # HF's MiniMaxRMSNorm default, which its lightning layers use


def rope_channel_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """HF's channel j of a q/k head is our channel order[j]."""
    half, n = rotary_dim // 2, (head_dim - rotary_dim) // 2
    ours = torch.arange(head_dim)
    a, b, rest = ours[:half], ours[half:rotary_dim], ours[rotary_dim:]
    return torch.cat([a, rest[:n], b, rest[n:]])


def _rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.rotary_dim == cfg.head_dim:
        return {"rope_type": "default", "rope_theta": cfg.rope_base}
    factor = cfg.rotary_dim / cfg.head_dim
    if int(factor * cfg.head_dim // 2) != cfg.rotary_dim // 2:  # HF derives the rotated pairs from the factor
        raise ValueError(f"model.rotary_dim={cfg.rotary_dim}: HF's partial_rotary_factor {factor} does not "
                         f"give {cfg.rotary_dim // 2} rotated pairs of head_dim {cfg.head_dim}")
    return {"rope_type": "proportional", "rope_theta": cfg.rope_base ** (cfg.head_dim / cfg.rotary_dim),
            "partial_rotary_factor": factor}


def to_hf_config(cfg: ModelConfig, **extra):
    """transformers' MiniMaxConfig of `cfg`; `extra` sets further fields (token ids, dtype)."""
    from transformers import MiniMaxConfig

    if cfg.lightning_norm_eps != _HF_LIGHTNING_NORM_EPS:
        raise ValueError(f"model.lightning_norm_eps={cfg.lightning_norm_eps}: HF MiniMaxForCausalLM fixes it "
                         f"at {_HF_LIGHTNING_NORM_EPS}")
    return MiniMaxConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        layer_types=[_LAYER_TYPES[t] for t in cfg.layer_types],
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=_rope_parameters(cfg), block_size=cfg.lightning_block_size,
        tie_word_embeddings=cfg.tie_embeddings, router_aux_loss_coef=cfg.aux_loss_coef,
        full_attn_alpha_factor=cfg.deepnorm_alpha, linear_attn_alpha_factor=cfg.deepnorm_alpha,
        mlp_alpha_factor=cfg.deepnorm_alpha, full_attn_beta_factor=cfg.deepnorm_beta,
        linear_attn_beta_factor=cfg.deepnorm_beta, mlp_beta_factor=cfg.deepnorm_beta, **extra,
    )


def _rotary_dim_and_base(hf, head_dim: int) -> tuple[int, float]:
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta", 1e6)}
    kind = rope.get("rope_type", "default")
    if kind == "default":
        legacy = getattr(hf, "rotary_dim", head_dim)
        if legacy != head_dim:  # the original remote code's field: transformers ignores it and rotates it all
            raise ValueError(f"HF config: rotary_dim={legacy} with default RoPE is ambiguous (transformers "
                             f"rotates all {head_dim} channels; MiniMax's original code only {legacy})")
        return head_dim, rope["rope_theta"]
    if kind != "proportional" or rope.get("factor", 1.0) != 1.0:
        raise ValueError(f"HF config: rope_parameters {rope} has no equivalent here (default or proportional "
                         "without scaling only)")
    rotary_dim = 2 * int(rope.get("partial_rotary_factor", 1.0) * head_dim // 2)
    return rotary_dim, rope["rope_theta"] ** (rotary_dim / head_dim)


def from_hf_config(hf) -> ModelConfig:
    alphas = {hf.full_attn_alpha_factor, hf.linear_attn_alpha_factor, hf.mlp_alpha_factor}
    betas = {hf.full_attn_beta_factor, hf.linear_attn_beta_factor, hf.mlp_beta_factor}
    if len(alphas) != 1 or len(betas) != 1:
        raise ValueError(f"HF config: per-sublayer DeepNorm factors differ (alpha {alphas}, beta {betas}); "
                         "this model uses one alpha and one beta")
    back = {v: k for k, v in _LAYER_TYPES.items()}
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rotary_dim, rope_base = _rotary_dim_and_base(hf, head_dim)
    return ModelConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, head_dim=head_dim, num_kv_heads=hf.num_key_value_heads,
        layer_types=[back[t] for t in hf.layer_types], rotary_dim=rotary_dim, rope_base=rope_base,
        num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, ffn_hidden_size=hf.intermediate_size,
        capacity_factor=None, aux_loss_coef=hf.router_aux_loss_coef, rms_norm_eps=hf.rms_norm_eps,
        lightning_block_size=hf.block_size, deepnorm_alpha=alphas.pop(), deepnorm_beta=betas.pop(),
        tie_embeddings=hf.tie_word_embeddings,
    )


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Our parameters' logical shapes, a tied one once, in model order."""
    from .transformer import MiniMaxForCausalLM

    with torch.device("meta"):
        model = MiniMaxForCausalLM(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _module_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def _reorder_channels(t: torch.Tensor, order: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows [heads * head_dim, in] of a q/k projection with each head's rows in `order` (also on meta)."""
    return t.reshape(-1, head_dim, t.shape[-1])[:, order.to(t.device)].reshape(t.shape)


def _rope_rows_to_hf(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return _reorder_channels(t, rope_channel_order(cfg.head_dim, cfg.rotary_dim), cfg.head_dim)


def _rope_rows_from_hf(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return _reorder_channels(t, torch.argsort(rope_channel_order(cfg.head_dim, cfg.rotary_dim)), cfg.head_dim)


def to_hf_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """Our state dict -> that of transformers' module (fused experts), without its buffers."""
    out = {}
    for name in parameter_shapes(cfg):
        t, prefix = state[name], "model." + name.rpartition(".")[0]
        if name.endswith(".experts.w_gate"):
            up = state[name.removesuffix("w_gate") + "w_up"]
            out[prefix + ".gate_up_proj"] = torch.cat([t.transpose(1, 2), up.transpose(1, 2)], dim=1)
        elif name.endswith(".experts.w_down"):
            out[prefix + ".down_proj"] = t.transpose(1, 2)
        elif name.endswith(_ROPE_ROWS):
            out[_module_name(name)] = _rope_rows_to_hf(t, cfg)
        elif not name.endswith(".experts.w_up"):
            out[_module_name(name)] = t
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf_state: dict, cfg: ModelConfig) -> dict:
    """The state dict of transformers' module -> ours (copies; a tied head once, as the embedding)."""
    out = {}
    for name in parameter_shapes(cfg):
        prefix = "model." + name.rpartition(".")[0]
        if name.endswith(".experts.w_down"):
            t = hf_state[prefix + ".down_proj"].transpose(1, 2)
        elif ".experts." in name:
            gate, up = hf_state[prefix + ".gate_up_proj"].chunk(2, dim=1)
            t = (gate if name.endswith("w_gate") else up).transpose(1, 2)
        elif name.endswith(_ROPE_ROWS):
            t = _rope_rows_from_hf(hf_state[_module_name(name)], cfg)
        else:
            t = hf_state[_module_name(name)]
        out[name] = t.clone(memory_format=torch.contiguous_format)
    return out


_EXPERT_FILES = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}


def _file_name(name: str, expert: int | None = None) -> str:
    """The tensor of an HF folder that holds our parameter `name` (expert `expert` of it)."""
    name = name.replace(".mlp.", ".block_sparse_moe.")
    if expert is not None:
        prefix, _, leaf = name.rpartition(".")
        name = f"{prefix}.{expert}.{_EXPERT_FILES[leaf]}.weight"
    return _module_name(name)


def hf_file_tensors(name: str, t: torch.Tensor, cfg: ModelConfig):
    """(name, tensor) of every tensor of an HF folder made from our parameter `name` holding `t`, one at a
    time (views; on meta: names and shapes)."""
    if ".mlp.experts." in name:  # ours [E, in, out]; HF one [out, in] per expert
        for e in range(t.shape[0]):
            yield _file_name(name, e), t[e].T
    elif name.endswith(_ROPE_ROWS):
        yield _file_name(name), _rope_rows_to_hf(t, cfg)
    else:
        yield _file_name(name), t


def hf_lightning_buffers(cfg: ModelConfig, layer: int) -> dict:
    """The buffers transformers' lightning layer `layer` saves in its folders (functions of the config alone),
    made by its own module at width 2, which they do not depend on."""
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    narrow = to_hf_config(replace(cfg, hidden_size=2, head_dim=2, rotary_dim=2))
    module = MiniMaxLightningAttention(narrow, layer)
    buffers = dict(module.named_buffers())
    return {f"model.layers.{layer}.self_attn.{k}": t for k, t in module.state_dict().items() if k in buffers}


def hf_folder_tensors(cfg: ModelConfig, parameter):
    """(name, tensor) of every tensor of the HF folder of a model, one at a time, in a fixed order;
    parameter(name, shape) gives our parameter's tensor (meta tensors give the names and shapes)."""
    for name, shape in parameter_shapes(cfg).items():
        yield from hf_file_tensors(name, parameter(name, shape), cfg)
    for layer, kind in enumerate(cfg.layer_types):
        if kind == "lightning":
            yield from hf_lightning_buffers(cfg, layer).items()


def from_hf_files_block(name: str, cfg: ModelConfig, offsets, sizes, tensor) -> torch.Tensor:
    """Block [offsets, offsets + sizes) of our parameter `name` from an HF folder, reading only the elements
    it needs: tensor(file_tensor_name)[index] reads them (e.g. safetensors' lazy `get_slice`)."""
    box = tuple(slice(o, o + n) for o, n in zip(offsets, sizes))
    if ".mlp.experts." in name:
        experts, rows, cols = box
        per_expert = [tensor(_file_name(name, e))[cols, rows] for e in range(experts.start, experts.stop)]
        return torch.stack(per_expert).transpose(1, 2)
    if name.endswith(_ROPE_ROWS):  # the channel order is per head: read the whole heads holding these rows
        rows, cols = box
        d = cfg.head_dim
        first, last = rows.start // d * d, -(-rows.stop // d) * d
        heads = _rope_rows_from_hf(tensor(_file_name(name))[first:last, cols], cfg)
        return heads[rows.start - first:rows.stop - first]
    return tensor(_file_name(name))[box]


def to_hf_model(model):
    """Our MiniMaxForCausalLM -> transformers.MiniMaxForCausalLM with the same weights."""
    from transformers import MiniMaxForCausalLM as HFModel

    hf = HFModel(to_hf_config(model.cfg)).to(next(model.parameters()).dtype)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg), strict=False)
    derived = {n for n, _ in hf.named_buffers()}  # functions of the config, made by HF's constructor
    if model.cfg.tie_embeddings:
        derived.add("lm_head.weight")
    missing = [k for k in missing if k not in derived]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion mismatch: missing {missing}, unexpected {unexpected}")
    return hf


def _meta_tensors(model) -> list[str]:
    """Tensors still on the meta device: parameters, buffers and tensors that modules keep as attributes."""
    found = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    return found + [f"{m}.{k}".lstrip(".") for m, module in model.named_modules()
                    for k, v in vars(module).items() if isinstance(v, torch.Tensor) and v.is_meta]


def from_hf_model(hf):
    """transformers.MiniMaxForCausalLM -> our MiniMaxForCausalLM with copies of its weights (in its dtype)."""
    from .transformer import MiniMaxForCausalLM

    cfg = from_hf_config(hf.config)
    with torch.device("meta"):  # no initialisation: every parameter is replaced below
        model = MiniMaxForCausalLM(cfg)
    weights = from_hf_state_dict(hf.state_dict(), cfg)
    name_of = {id(p): n for n, p in model.named_parameters()}
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():  # by identity, so a tied head stays tied
        for attr, p in list(module._parameters.items()):
            if p is not None:
                made.setdefault(id(p), torch.nn.Parameter(weights[name_of[id(p)]], p.requires_grad))
                module._parameters[attr] = made[id(p)]
    left = _meta_tensors(model)
    if left:  # would fail only at the first forward ("Cannot copy out of meta tensor")
        raise RuntimeError(f"from_hf_model: still on the meta device after loading: {left}")
    return model

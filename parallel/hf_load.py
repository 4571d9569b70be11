"""Hugging Face weights into a parallelized model: every rank reads only the slices its parameters hold.

`load_hf_weights(model, hf_dir)` takes a folder of transformers' MiniMaxForCausalLM (`config.json` and
`model.safetensors` or shards with `model.safetensors.index.json`) and fills every parameter of this rank's
part of the model (materialized, any layout) in place. A parameter's `ShardSpec` says which block of the
logical tensor it holds; `model.hf_convert.from_hf_files_block` turns that block into the HF slices to read
(the rank's experts' per-expert tensors, transposed; the whole heads holding its q/k rows, back in our RoPE
channel order), and safetensors' lazy `get_slice` reads just those bytes. No process group is used: ranks
read independently.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from model.hf_convert import from_hf_config, from_hf_files_block, hf_file_tensors, parameter_shapes

from .shard import spec_of

# What decides the tensors' shapes and meaning; norms' eps, DeepNorm factors and the RoPE base may differ
# (a run may change them, e.g. the base for a long-context stage).
_STRUCTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "num_kv_heads",
              "layer_types", "rotary_dim", "num_experts", "ffn_hidden_size", "tie_embeddings")


def _file_of_each_tensor(hf_dir: Path) -> dict[str, Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: hf_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{hf_dir}: neither model.safetensors.index.json nor model.safetensors")
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _check_config(hf_dir: Path, cfg) -> None:
    from transformers import MiniMaxConfig

    theirs = from_hf_config(MiniMaxConfig.from_pretrained(hf_dir))
    differ = [f"{k}: {getattr(theirs, k)} there, {getattr(cfg, k)} here" for k in _STRUCTURE
              if getattr(theirs, k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"{hf_dir} is another model: {'; '.join(differ)}")


@torch.no_grad()
def load_hf_weights(model, hf_dir) -> None:
    """Fill this rank's parameters of `model` (a MiniMaxForCausalLM, parallelized or not) from `hf_dir`."""
    from safetensors import safe_open

    hf_dir, cfg = Path(hf_dir), model.cfg
    _check_config(hf_dir, cfg)
    files = _file_of_each_tensor(hf_dir)
    with ExitStack() as stack:
        opened = {}

        def tensor(hf_name):
            path = files.get(hf_name)
            if path is None:
                raise KeyError(f"{hf_dir} has no tensor {hf_name}")
            if path not in opened:
                opened[path] = stack.enter_context(safe_open(path, framework="pt"))
            return opened[path].get_slice(hf_name)

        for name, shape in parameter_shapes(cfg).items():  # a wrong shape would read the wrong elements
            for hf_name, want in hf_file_tensors(name, torch.empty(shape, device="meta"), cfg):
                have = tuple(tensor(hf_name).get_shape())
                if have != tuple(want.shape):
                    raise ValueError(f"{hf_dir}: {hf_name} is {have}, this model needs {tuple(want.shape)}")
        for name, p in model.named_parameters():
            spec = spec_of(p)
            p.copy_(from_hf_files_block(name, cfg, spec.offsets, spec.local_shape, tensor))

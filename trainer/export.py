"""`python -m trainer.export <checkpoint> out=<dir> [dtype=fp32|bf16] [max_shard_size=5GB]`: a trained
checkpoint as a Hugging Face folder that transformers' `MiniMaxForCausalLM.from_pretrained` loads.

<checkpoint>: a checkpoint folder of `trainer.train` (`<run_dir>/checkpoints/step_N`), written under any
parallel layout, or a run dir / checkpoints folder (its newest complete checkpoint). The folder gets
safetensors shards `model-0000i-of-0000n.safetensors` of at most max_shard_size each (a larger single tensor
gets its own) with `model.safetensors.index.json`, `config.json` (transformers' MiniMaxConfig) and the run's
tokenizer (`tokenizer.json`, `tokenizer_config.json`). dtype: fp32 (default, the master weights as trained)
or bf16.

One tensor at a time: every parameter is read whole from the DCP checkpoint (its fp32 master weights, whatever
layout wrote them), converted (`model.hf_convert.hf_folder_tensors`) and streamed into its shard, whose header
is known in advance from the checkpoint's metadata, so memory is bounded by the largest parameter. Bad input
is one line on stderr with exit code 2 and nothing written; the folder appears only when complete (written as
`.tmp-<name>` next to it, then renamed).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from . import checkpoint as ckpt
from .config import ConfigError, command_line, key_value_args

DTYPES = {"fp32": (torch.float32, "F32"), "bf16": (torch.bfloat16, "BF16")}  # safetensors' dtype names
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
INDEX_FILE = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'5GB', '500MB', '40KB' or a number of bytes."""
    unit = text[-2:].upper()
    try:
        size = float(text[:-2]) * UNITS[unit] if unit in UNITS else int(text)
    except ValueError:
        size = 0
    if size <= 0:
        raise ConfigError(f"max_shard_size={text}: expected a positive size such as 5GB, 500MB or 1000000")
    return int(size)


def parse_args(argv: list[str]) -> tuple[Path, Path, str, int]:
    options = {"out": None, "dtype": "fp32", "max_shard_size": "5GB"}
    positional = key_value_args(argv, options)
    if len(positional) != 1:
        raise ConfigError(f"expected one checkpoint folder, got {len(positional)}: {' '.join(positional)}")
    if not options["out"]:
        raise ConfigError("out=<dir> is required")
    if options["dtype"] not in DTYPES:
        raise ConfigError(f"dtype={options['dtype']} must be one of {'|'.join(DTYPES)}")
    return Path(positional[0]), Path(options["out"]), options["dtype"], parse_size(options["max_shard_size"])


def resolve_checkpoint(path: Path) -> Path:
    """A complete checkpoint folder, or the newest one in a run dir or checkpoints folder."""
    if not path.is_dir():
        raise ConfigError(f"checkpoint folder {path} does not exist")
    if not ckpt.is_complete(path):
        inner = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        newest = ckpt.latest_checkpoint(inner)
        if newest is None:
            raise ConfigError(f"{path} is not a checkpoint (no complete step_* folder with the "
                              f"'{ckpt.MARKER}' marker)")
        path = newest
    for name in (".metadata", "config.yaml"):
        if not (path / name).is_file():
            raise ConfigError(f"{path} is not a checkpoint of trainer.train (no {name})")
    return path


class CheckpointReader(dcp.FileSystemReader):
    """One parameter at a time from a DCP checkpoint, whole, on one process (no process group)."""

    @functools.cached_property
    def metadata(self):
        return super().read_metadata()

    def read_metadata(self, *args, **kwargs):  # dcp.load asks once per tensor; read the file once
        return self.metadata

    def shape(self, name: str) -> tuple | None:
        md = self.metadata.state_dict_metadata.get(f"model/{name}")
        return None if md is None else tuple(md.size)

    def read(self, name: str) -> torch.Tensor:
        md = self.metadata.state_dict_metadata[f"model/{name}"]
        whole = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        with warnings.catch_warnings():  # DCP warns about single-process use even when asked for it
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({f"model/{name}": whole}, storage_reader=self, no_dist=True)
        return whole


def plan_shards(tensors: list[tuple[str, tuple]], itemsize: int, max_bytes: int) -> list[list]:
    """Consecutive (name, shape) runs of at most max_bytes each (a larger tensor alone)."""
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def safetensors_header(tensors: list[tuple[str, tuple]], dtype_name: str, itemsize: int) -> bytes:
    """The safetensors header of these tensors, stored in this order (the data follows it, 8-byte aligned)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def read_run(checkpoint: Path):
    """The checkpoint's model config, checked against its tensors, and the run's tokenizer."""
    from omegaconf import OmegaConf

    from data import build_tokenizer
    from model.hf_convert import parameter_shapes

    from .train import build_model_config

    run_cfg = OmegaConf.load(checkpoint / "config.yaml")
    model_cfg = build_model_config(run_cfg)
    reader = CheckpointReader(str(checkpoint))
    for name, shape in parameter_shapes(model_cfg).items():
        if reader.shape(name) != shape:
            raise ConfigError(f"checkpoint {checkpoint}: parameter {name} is {reader.shape(name)} there, "
                              f"{shape} in its config.yaml")
    return model_cfg, build_tokenizer(run_cfg.data.tokenizer), reader


def save_tokenizer(tokenizer, folder: Path) -> None:
    backend = tokenizer._backend  # a tokenizers.Tokenizer (tokenizer.json) or a transformers tokenizer
    if not hasattr(backend, "save_pretrained"):
        from transformers import PreTrainedTokenizerFast

        eos = backend.id_to_token(tokenizer.eos_id)
        backend = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)
    backend.save_pretrained(folder)


def write_weights(folder: Path, reader: CheckpointReader, cfg, dtype: str, max_bytes: int) -> tuple[int, int]:
    """The safetensors shards and their index; returns (number of shards, bytes)."""
    from model.hf_convert import hf_folder_tensors

    torch_dtype, dtype_name = DTYPES[dtype]
    itemsize = torch_dtype.itemsize
    planned = [(name, tuple(t.shape))
               for name, t in hf_folder_tensors(cfg, lambda _, shape: torch.empty(shape, device="meta"))]
    shards = plan_shards(planned, itemsize, max_bytes)
    tensors = hf_folder_tensors(cfg, lambda name, _: reader.read(name))  # one parameter read at a time
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(folder / file_name, "wb") as f:
            f.write(safetensors_header(shard, dtype_name, itemsize))
            for (name, _), (_, t) in zip(shard, tensors):  # the plan walks the conversion's order
                f.write(t.to(torch_dtype).contiguous().view(torch.uint8).numpy())
                weight_map[name] = file_name
    total = sum(math.prod(shape) for _, shape in planned) * itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return len(shards), total


def export(checkpoint: Path, out: Path, dtype: str, max_bytes: int) -> str:
    """Write the HF folder `out` from `checkpoint`; returns a summary line."""
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's load errors are BaseExceptions

    from model.hf_convert import to_hf_config
    from parallel.atomic_folder import begin_folder

    checkpoint = resolve_checkpoint(checkpoint)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"out={out} exists and is not an empty folder")
    try:
        cfg, tokenizer, reader = read_run(checkpoint)
        hf_config = to_hf_config(cfg, architectures=["MiniMaxForCausalLM"], eos_token_id=tokenizer.eos_id,
                                 bos_token_id=None, dtype=DTYPES[dtype][0])
    except (ValueError, OSError) as exc:  # ConfigError included
        raise ConfigError(str(exc).strip().splitlines()[0]) from None
    tmp = begin_folder(out)
    try:
        shards, nbytes = write_weights(tmp, reader, cfg, dtype, max_bytes)
        hf_config.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        os.replace(tmp, out)
    except (CheckpointException, OSError) as exc:
        raise ConfigError(f"{checkpoint} -> {out}: {str(exc).strip().splitlines()[0]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"exported {checkpoint} to {out}: {shards} shard(s), {nbytes / 1e9:.3f} GB {dtype}"


def main(argv: list[str] | None = None) -> int:
    def run(args):
        print(export(*parse_args(args)))
        return 0

    return command_line(__doc__, argv, run)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

"""Layout-independent checkpoints of shards only, with torch.distributed.checkpoint (DCP).

Keys are the model's parameter names (which `parallelize` keeps) under `model/` (the fp32 master weights),
`exp_avg/` and `exp_avg_sq/` (AdamW's moments). Each rank writes and reads only the elements its distributed
optimizer owns: its slice of every bucket, which is a flat range of some parameters' blocks, is cut into
rectangular pieces of the logical tensors (`flat_range_boxes`) with their global offsets, so DCP records
where every piece belongs, writes each once (replicas are de-duplicated) and, on load under any other layout,
reads exactly the pieces that overlap what the rank owns there. Nothing is gathered; the only copies are
DCP's own (at most the pieces of one write). Without an optimizer (export, evaluation) a rank reads its
parameters' whole blocks. Loading works for any layout, also a single process without torch.distributed.

Layout of a checkpoint folder: DCP's `.metadata` + `__<rank>_<n>.distcp`, `extra.pt` (the caller's picklable
dict, from rank 0), `layout.json` (informative), `checksums.json` (size and CRC-32 of every file) and the
`complete` marker, written last. `save_checkpoint` writes into `.tmp-<name>` next to the target and renames it
into place (`parallel.atomic_folder`). Each rank checksums its own shards right after writing them (also in an
async save's background thread) into a part of the manifest, which the rank completing the folder merges
without a collective; `verify_checkpoint` checks the files against it before a load, spread over the ranks.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from .atomic_folder import (
    MANIFEST,
    MARKER,
    begin_folder,
    file_problem,
    finish_folder,
    fsync_file,
    read_manifest,
    temp_folder,
    write_checksums_part,
)
from .shard import spec_of

EXTRA_FILE = "extra.pt"


class DamagedCheckpoint(ValueError):
    """A file of a checkpoint is missing or differs from the checkpoint's manifest."""


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _distributed() -> bool:
    return _initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def flat_range_boxes(shape: tuple, start: int, stop: int) -> list[tuple[tuple, tuple]]:
    """(offsets, sizes) of the boxes whose row-major element ranges tile [start, stop) of a `shape` tensor,
    in order: at most a partial row, full rows, a partial row at every level."""
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    boxes, row = [], start // inner
    if start % inner:  # the head of a partial first row
        end = min(stop, (row + 1) * inner)
        boxes += [((row, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], start - row * inner, end - row * inner)]
        start, row = end, row + 1
    full = stop // inner - row
    if full > 0:
        boxes.append(((row, *([0] * (len(shape) - 1))), (full, *shape[1:])))
        start, row = start + full * inner, row + full
    if start < stop:  # the tail of a partial last row
        boxes += [((row, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], 0, stop - start)]
    return boxes


class Blocks:
    """The pieces of one logical tensor this rank holds, in DCP's checkpointable-object protocol."""

    def __init__(self, shape: tuple, pieces: list[tuple[tuple, torch.Tensor]]):
        self.shape, self.pieces = torch.Size(shape), {torch.Size(o): t for o, t in pieces}

    def __create_write_items__(self, fqn: str, obj):
        return [WriteItem(index=MetadataIndex(fqn, o), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(ChunkStorageMetadata(o, t.shape),
                                                      TensorProperties(dtype=t.dtype), self.shape))
                for o, t in self.pieces.items()]

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(o, t.shape) for o, t in self.pieces.items()]

    def piece(self, offset) -> torch.Tensor:
        return self.pieces[torch.Size(offset)]


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.piece(index.offset) if isinstance(obj, Blocks) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # The default first re-creates meta tensors in place, which drops objects it does not know (Blocks);
        # our state dict is flat and holds no meta tensors.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.piece(index.offset) if isinstance(obj, Blocks) else super().lookup_tensor(index)


def _pieces(spec, flat: torch.Tensor, start: int, stop: int) -> list[tuple[tuple, torch.Tensor]]:
    """Elements [start, stop) of a parameter's block, held in `flat`, as (global offset, view) pieces."""
    out, at = [], 0
    for offsets, sizes in flat_range_boxes(spec.local_shape, start, stop):
        n = math.prod(sizes)
        out.append((tuple(o + g for o, g in zip(offsets, spec.offsets)), flat[at:at + n].view(sizes)))
        at += n
    return out


def _state(model, optimizer) -> dict:
    """DCP state dict of this rank's elements: views of the tensors a load writes into in place."""
    sd: dict = {}
    if optimizer is None:  # the parameters' whole blocks
        for name, p in model.named_parameters():
            sd[f"model/{name}"] = Blocks(spec_of(p).shape, _pieces(spec_of(p), p.data.view(-1), 0, p.numel()))
        return sd
    sd["optim/step"] = torch.tensor(optimizer.step_count)
    for b, master, moments in optimizer.slices():
        lo, hi = b.shard
        for name, p, o in zip(b.names, b.params, b.offsets):
            start, stop = max(lo, o), min(hi, o + p.numel())
            if start >= stop:
                continue
            spec = spec_of(p)
            for key, flat in (("model", master), *moments.items()):
                sd.setdefault(f"{key}/{name}", Blocks(spec.shape, []))
                sd[f"{key}/{name}"].pieces.update(
                    (torch.Size(g), t) for g, t in _pieces(spec, flat[start - lo:stop - lo], start - o, stop - o))
    return sd


def _check_shapes(directory: Path, model) -> None:
    """A checkpoint of another model fails here, naming the first parameter that differs."""
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    for name, p in model.named_parameters():
        md = saved.get(f"model/{name}")
        if md is None:
            raise ValueError(f"checkpoint {directory} has no parameter {name}")
        if tuple(md.size) != spec_of(p).shape:
            raise ValueError(f"checkpoint {directory}: parameter {name} is {tuple(md.size)} there, "
                             f"{spec_of(p).shape} in this model")


class _ChecksummingWriter(dcp.FileSystemWriter):
    """DCP's file writer; it also checksums this rank's files as soon as they are written, so the cost is
    spread over the ranks and the folder's completion needs no collective."""

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)
        written.wait()
        prefix, folder = plan.storage_data.prefix, Path(self.path)  # this rank's files: __<rank>_<n>.distcp
        write_checksums_part(folder, sorted(p.name for p in folder.glob(f"{prefix}*.distcp")),
                             f"rank{prefix.strip('_')}")
        return written


class _AlreadyStaged:
    """DCP's stager protocol for a state dict whose pieces are host copies already (`snapshot`)."""

    should_synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


@torch.no_grad()
def snapshot(state: dict) -> dict:
    """Host copies of every piece: what an async save writes while training changes the originals."""
    return {k: Blocks(v.shape, [(o, t.to("cpu", copy=True)) for o, t in v.pieces.items()])
            if isinstance(v, Blocks) else v.to("cpu", copy=True) for k, v in state.items()}


def _write_extra(directory: Path, extra, topo) -> None:
    if not _distributed() or dist.get_rank() == 0:
        torch.save(extra or {}, directory / EXTRA_FILE)
        fsync_file(directory / EXTRA_FILE)
        layout = topo.describe() if topo is not None else "single process"
        (directory / "layout.json").write_text(json.dumps({"saved_by": layout}))


def save_state_async(directory, model, optimizer, extra=None, topo=None, process_group=None):
    """Start writing the state into `directory` in a background thread; returns DCP's future (done when every
    rank's data and the metadata are written). `process_group`: a gloo group of all ranks, kept apart from the
    training's collectives. The host copy is taken before this returns."""
    directory = Path(directory)
    _write_extra(directory, extra, topo)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return dcp.async_save(snapshot(_state(model, optimizer)), storage_writer=_ChecksummingWriter(directory),
                              planner=_SavePlanner(), process_group=process_group, async_stager=_AlreadyStaged(),
                              no_dist=not _initialized())


def save_state(directory, model, optimizer=None, extra=None, topo=None) -> None:
    """Write the state into `directory` (collective; no marker, not atomic: see save_checkpoint)."""
    directory = Path(directory)
    with warnings.catch_warnings():  # DCP warns about single-process use even when asked for it
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_state(model, optimizer), storage_writer=_ChecksummingWriter(directory), planner=_SavePlanner(),
                 no_dist=not _initialized())
    _write_extra(directory, extra, topo)
    _barrier()


@torch.no_grad()
def load_state(directory, model, optimizer=None, topo=None) -> dict:
    """Fill `model` (and `optimizer`) of any layout from `directory`; returns the saved `extra`."""
    directory = Path(directory)
    _check_shapes(directory, model)
    sd = _state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(directory), planner=_LoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=not _initialized())
    if optimizer is not None:
        optimizer.set_step(int(sd["optim/step"]))
        optimizer.publish()  # the loaded master slices become every rank's parameters
    return torch.load(directory / EXTRA_FILE, weights_only=False)


def save_checkpoint(path, model, optimizer=None, extra=None, topo=None) -> Path:
    """Atomically write checkpoint folder `path`: all ranks write `.tmp-<name>`, rank 0 adds the marker last and
    renames it into place (replacing an older `path`). Collective."""
    path = Path(path)
    main = not _distributed() or dist.get_rank() == 0
    tmp = begin_folder(path) if main else temp_folder(path)
    _barrier()
    save_state(tmp, model, optimizer, extra, topo)
    if main:
        finish_folder(tmp, path)
    _barrier()
    return path


def verify_checkpoint(path) -> bool:
    """Check every file of checkpoint `path` against its manifest (collective): rank r checks files r, r + world,
    ... and an all-reduce agrees on the outcome. DamagedCheckpoint names the first bad file; False when the
    checkpoint has no manifest (saved before checksums were recorded), True when every file matches."""
    path = Path(path)
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    manifest = [None]
    if rank == 0:  # rank 0's reading decides, so every rank checks the same list
        try:
            manifest[0] = read_manifest(path)
        except ValueError as exc:
            manifest[0] = str(exc)
    if world > 1:
        dist.broadcast_object_list(manifest, src=0)
    files = manifest[0]
    if isinstance(files, str):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {files}")
    if files is None:
        return False
    names = sorted(files)
    problems = {name: file_problem(path, name, files[name]) for name in names[rank::world]}
    bad = torch.tensor([problems.get(name) is not None for name in names], dtype=torch.int32)
    if world > 1:  # each file was checked by one rank
        bad = bad.cuda() if dist.get_backend() == "nccl" else bad  # NCCL reduces device tensors only
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    first = next((name for name, b in zip(names, bad.tolist()) if b), None)
    if first is None:
        return True
    message = [problems.get(first)]  # from the rank that checked the file
    if world > 1:
        dist.broadcast_object_list(message, src=names.index(first) % world)
    raise DamagedCheckpoint(f"checkpoint {path} is damaged: {message[0]}")


def load_checkpoint(path, model, optimizer=None, topo=None, verify: bool = True) -> dict:
    """`load_state` from a complete checkpoint folder; `verify`: check its files first (`verify_checkpoint`)."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no '{MARKER}' marker) or missing")
    if verify and not verify_checkpoint(path):
        warnings.warn(f"checkpoint {path} has no {MANIFEST}: loading it unverified", stacklevel=2)
    return load_state(path, model, optimizer, topo)

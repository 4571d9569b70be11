"""Layout-independent checkpoints with torch.distributed.checkpoint (DCP).

Every parameter and its AdamW moments are saved as the full logical tensor: a rank's TP/EP shard becomes a
DTensor with `Shard(dim)` placements over its groups, so DCP records global offsets, writes each shard once
(DP replicas are de-duplicated) and, on load, reads exactly the pieces the new layout needs. ZeRO-1 shards are
first gathered to whole (TP-local) parameters (`ZeroAdamW.full_state`). Loading works for any layout, also a
single process without torch.distributed. Keys are the model's parameter names, which `parallelize` keeps.

Layout of a checkpoint folder: DCP's `.metadata` + `__<rank>_<n>.distcp`, `extra.pt` (the caller's picklable
dict, from rank 0), `layout.json` (informative), and the `complete` marker, written last.
`save_checkpoint` writes into `.tmp-<name>` next to the target and renames it into place (`parallel.atomic_folder`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .atomic_folder import MARKER, begin_folder, finish_folder, fsync_file, temp_folder

EXTRA_FILE = "extra.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")
_MESHES: dict = {}


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _distributed() -> bool:
    return _initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def shard_spec(param, topo) -> tuple:
    """((dim, group name), ...) of the groups this parameter is split over (groups of one dropped)."""
    spec = getattr(param, "shard_spec", None)
    if spec is None:
        dim = getattr(param, "tp_partition_dim", None)
        spec = () if dim is None else ((dim, "tp"),)
    return tuple((d, g) for d, g in spec if topo is not None and topo.size(g) > 1)


def _mesh(names: tuple, topo, device_type: str) -> DeviceMesh:
    key = (names, tuple(tuple(topo.ranks[n]) for n in names), device_type)
    if key not in _MESHES:
        if len(names) == 1:
            _MESHES[key] = DeviceMesh.from_group(topo.groups[names[0]], device_type)
        elif names == ("ep", "etp"):  # folding: ETP index fastest inside the EP x ETP group
            ranks = torch.tensor(topo.ranks["ep_etp"]).view(topo.ep, topo.etp)
            _MESHES[key] = DeviceMesh.from_group([topo.groups["ep"], topo.groups["etp"]], device_type,
                                                 mesh=ranks, mesh_dim_names=("ep", "etp"))
        else:
            raise NotImplementedError(f"checkpoint: sharding over groups {names} is not supported")
    return _MESHES[key]


def _to_global(local: torch.Tensor, spec: tuple, topo):
    if not spec:
        return local
    shape = list(local.shape)
    for d, g in spec:
        shape[d] *= topo.size(g)
    stride = torch.empty(shape, device="meta").stride()
    mesh = _mesh(tuple(g for _, g in spec), topo, local.device.type)
    return DTensor.from_local(local, mesh, [Shard(d) for d, _ in spec], run_check=False,
                              shape=torch.Size(shape), stride=stride)


def _state(model, optimizer, topo, fresh: bool) -> tuple[dict, dict]:
    """DCP state dict (global view) and, per key, the local tensor behind it. `fresh`: empty tensors to load into."""
    sd: dict = {"model": {}}
    local: dict = {}
    params = dict(model.named_parameters())
    for name, p in params.items():
        t = torch.empty_like(p.data) if fresh else p.data
        local[("model", name)] = t
        sd["model"][name] = _to_global(t, shard_spec(p, topo), topo)
    if optimizer is not None:
        full, step = ({}, 0) if fresh else optimizer.full_state()
        sd["optim"] = {"step": torch.tensor(step)}
        for key in MOMENTS:
            sd["optim"][key] = {}
            for name, p in params.items():
                t = torch.zeros_like(p.data) if fresh else full[p][key]
                local[(key, name)] = t
                sd["optim"][key][name] = _to_global(t, shard_spec(p, topo), topo)
    return sd, local


def save_state(directory, model, optimizer=None, extra=None, topo=None) -> None:
    """Write the state into `directory` (collective; no marker, not atomic: see save_checkpoint)."""
    directory = Path(directory)
    sd, _ = _state(model, optimizer, topo, fresh=False)
    with warnings.catch_warnings():  # DCP warns about single-process use even when asked for it
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(sd, checkpoint_id=str(directory), no_dist=not _initialized())
    if not _distributed() or dist.get_rank() == 0:
        torch.save(extra or {}, directory / EXTRA_FILE)
        fsync_file(directory / EXTRA_FILE)
        layout = topo.describe() if topo is not None else "single process"
        (directory / "layout.json").write_text(json.dumps({"saved_by": layout}))
    _barrier()


def load_state(directory, model, optimizer=None, topo=None) -> dict:
    """Fill `model` (and `optimizer`) of any layout from `directory`; returns the saved `extra`."""
    directory = Path(directory)
    sd, local = _state(model, optimizer, topo, fresh=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(directory), no_dist=not _initialized())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.data.copy_(local[("model", name)])
        if optimizer is not None:
            per_param = {p: {key: local[(key, name)] for key in MOMENTS} for name, p in params.items()}
            optimizer.load_full_state(per_param, int(sd["optim"]["step"]))
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


def load_checkpoint(path, model, optimizer=None, topo=None) -> dict:
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no '{MARKER}' marker) or missing")
    return load_state(path, model, optimizer, topo)

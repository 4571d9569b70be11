"""Process groups and the parallel versions of the model's layers. `model/` knows nothing of this.

    topo = Topology.from_config(cfg.parallel, model_cfg, seq_len)       # validates, builds every group
    model = materialize(parallelize(meta_model, topo), device, seed)     # TP/SP, CP, EP; only this rank's blocks
    opt, grad_sync = build_optimizer(model, topo, lr=..., ...)           # reduce-scatter buckets + distributed AdamW
    save_checkpoint(path, model, opt, extra, topo) / load_checkpoint(path, model, opt, topo)

`parallelize` is imported eagerly: the function must shadow its submodule's name in this package. The other
names resolve lazily, so importing one submodule (e.g. `parallel.collectives`) stays cheap.
"""

from .parallelize import data_parallel_slice, parallelize
from .topology import Topology, validate_layout

_EXPORTS = {
    "GradSync": "data_parallel", "materialize": "shard",
    "DistributedAdamW": "optimizer", "build_optimizer": "optimizer",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "save_state": "checkpoint",
    "load_state": "checkpoint",
}

__all__ = ["DistributedAdamW", "GradSync", "Topology", "build_optimizer", "data_parallel_slice", "load_checkpoint",
           "load_state", "materialize", "parallelize", "save_checkpoint", "save_state", "validate_layout"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parallel' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"parallel.{_EXPORTS[name]}"), name)

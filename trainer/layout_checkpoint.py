"""Checkpoint IO of the two layouts, and loading either checkpoint format into either layout.

- parallel=single writes `state.pt` (torch.save from rank 0: model, optimizer and the loop's `extra` state);
- parallel layouts write torch DCP through `parallel.checkpoint` (every rank, layout-independent), with the
  loop's `extra` state in `extra.pt`.
Both live in the same atomic `step_*` folders (trainer.checkpoint). A DCP checkpoint loads into any parallel
layout directly and into parallel=single through `AdamWMoments`; a `state.pt` checkpoint loads into a parallel
layout by cutting its whole tensors the way `parallelize` cuts the model (`_shard_like_model`).
"""

from __future__ import annotations

import torch

from . import checkpoint as ckpt
from .distributed import barrier
from .logger import say

MOMENTS = ("exp_avg", "exp_avg_sq")


class AdamWMoments:
    """parallel.checkpoint's optimizer interface (`full_state` / `load_full_state`) over a plain torch AdamW
    (or apex FusedAdam, which keeps its step per param group)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def _params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def full_state(self) -> tuple[dict, int]:
        out, step = {}, 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                if "step" in state:
                    step = int(state["step"])
                elif "step" in group:
                    step = int(group["step"])
                out[p] = {k: state[k].clone() if k in state else torch.zeros_like(p) for k in MOMENTS}
        return out, step

    def load_full_state(self, per_param: dict, step: int) -> None:
        sd = self.optimizer.state_dict()
        # state_dict numbers the parameters in param-group order; load_state_dict moves the values to each
        # parameter's device and dtype policy (fused AdamW keeps `step` on the device)
        sd["state"] = {i: {"step": torch.tensor(float(step)), **{k: per_param[p][k] for k in MOMENTS}}
                       for i, p in enumerate(self._params())}
        for group in sd["param_groups"]:
            if "step" in group:
                group["step"] = step
        self.optimizer.load_state_dict(sd)


# ---- parallel=single ---------------------------------------------------------------------------------------

def save_plain(layout, root, step, extra, config_yaml, meta, keep_last):
    """Rank 0 writes (every rank holds the same replica and the same data position); others wait."""
    path = None
    if layout.env.is_main:
        state = {"model": layout.model.state_dict(), "optimizer": layout.optimizer.state_dict(), **extra}
        path = ckpt.save_checkpoint(root, step, state, config_yaml, meta, keep_last)
        say(f"checkpoint: {path}")
    barrier(layout.env)
    return path


def load_into_plain(layout, path) -> dict:
    if ckpt.is_torch_save_format(path):
        state = ckpt.load_state(path)
        layout.model.load_state_dict(state["model"])
        layout.optimizer.load_state_dict(state["optimizer"])
        return state
    from parallel.checkpoint import load_checkpoint

    return load_checkpoint(path, layout.model, AdamWMoments(layout.optimizer), topo=None)


# ---- parallel layouts --------------------------------------------------------------------------------------

def save_parallel(layout, root, step, extra, config_yaml, meta, keep_last):
    """All ranks write their shards into rank 0's temp folder; rank 0 then completes it atomically."""
    from parallel.checkpoint import save_state

    tmp = ckpt.begin_save(root, step) if layout.env.is_main else ckpt.temp_dir(root, step)
    barrier(layout.env)
    save_state(tmp, layout.model, layout.optimizer, extra, layout.topo)  # ends with a barrier
    path = None
    if layout.env.is_main:
        path = ckpt.finish_save(root, step, tmp, config_yaml, meta, keep_last)
        say(f"checkpoint: {path} ({layout.spec.description})")
    barrier(layout.env)
    return path


def load_into_parallel(layout, path) -> dict:
    if not ckpt.is_torch_save_format(path):
        from parallel.checkpoint import load_checkpoint

        return load_checkpoint(path, layout.model, layout.optimizer, layout.topo)
    state = ckpt.load_state(path)  # a parallel=single checkpoint: whole tensors, read by every rank
    params = dict(layout.model.named_parameters())
    local = _shard_like_model(layout, state["model"])
    with torch.no_grad():
        for name, p in params.items():
            p.data.copy_(local[name])  # in place: the parameters are views of ZeRO-1's flat buffers
    opt_state = state["optimizer"]
    names = _optimizer_param_names(layout)
    step = _plain_optimizer_step(opt_state)
    per_param = {p: {} for p in params.values()}
    for key in MOMENTS:
        whole = {name: opt_state["state"][i][key] if key in opt_state["state"].get(i, {}) else None
                 for i, name in enumerate(names)}
        whole = {n: t if t is not None else torch.zeros_like(state["model"][n]) for n, t in whole.items()}
        for name, t in _shard_like_model(layout, whole).items():
            per_param[params[name]][key] = t
    layout.optimizer.load_full_state(per_param, step)
    return state


def _shard_like_model(layout, whole: dict) -> dict:
    """This rank's part of whole-model tensors keyed by parameter name, cut exactly as `parallelize` cuts the
    weights: load them into a fresh whole model and parallelize that."""
    from parallel import parallelize

    carrier = layout.model_factory()
    with torch.no_grad():
        for name, p in carrier.named_parameters():
            p.copy_(whole[name])
    carrier = parallelize(carrier, layout.topo)
    return {name: p.detach() for name, p in carrier.named_parameters()}


def _optimizer_param_names(layout) -> list[str]:
    """Parameter names in the order parallel=single's optimizer numbers them (trainer.optim.param_groups)."""
    from model import MiniMaxForCausalLM

    from .optim import param_groups

    with torch.device("meta"):  # names and order only: no weights allocated
        probe = MiniMaxForCausalLM(layout.model.cfg)
    name_of = {id(p): n for n, p in probe.named_parameters()}
    return [name_of[id(p)] for group in param_groups(probe, 0.0) for p in group["params"]]


def _plain_optimizer_step(opt_state: dict) -> int:
    for state in opt_state["state"].values():
        if "step" in state:
            return int(state["step"])
    return int(next((g["step"] for g in opt_state["param_groups"] if "step" in g), 0))

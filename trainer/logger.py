"""Per-step outputs of rank 0: a live tqdm bar, `metrics.jsonl` in the run dir (each row with its wall-clock `time`),
and wandb (imported lazily)."""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import OmegaConf


def say(msg: str) -> None:
    """A console line that does not break the progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:
        print(msg, file=sys.stderr, flush=True)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines past `last_step` (steps a crashed run logged after its last checkpoint) before resuming."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(line + "\n" for line in kept))


class RunLogger:
    def __init__(self, cfg, run_dir: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        self.cfg = cfg
        self.log_every = int(cfg.trainer.log_every)
        self.bar = None
        self.metrics_file = None
        self.wandb_run = None
        if not enabled:
            return
        path = run_dir / cfg.logging.metrics_file
        if start_step > 0:
            truncate_metrics(path, start_step)
        self.metrics_file = open(path, "a" if start_step > 0 else "w", buffering=1)  # noqa: SIM115 -- closed in close()
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=int(cfg.trainer.steps), initial=start_step, desc=str(cfg.trainer.name),
                            unit="step", dynamic_ncols=True, file=sys.stderr)
        self.wandb_run = self._start_wandb(run_dir)

    def _start_wandb(self, run_dir: Path):
        wcfg = self.cfg.logging.wandb
        mode = wcfg.mode
        if mode == "disabled":
            return None  # never import wandb when it is off
        if mode == "online" and not wandb_has_credentials():
            say("wandb: no credentials (WANDB_API_KEY or netrc); logging offline to the run dir instead")
            mode = "offline"
        try:
            import wandb
        except ImportError:
            say(f"wandb: logging.wandb.mode={wcfg.mode} but wandb is not installed; continuing without it")
            return None
        id_file = run_dir / "wandb_run_id"  # the same wandb run continues across resumes
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        id_file.write_text(run_id)
        try:
            return wandb.init(
                project=wcfg.project, entity=wcfg.entity, name=wcfg.name or str(self.cfg.trainer.name),
                tags=list(wcfg.tags), dir=str(run_dir), mode=mode, id=run_id, resume="allow",
                config=OmegaConf.to_container(self.cfg, resolve=True))
        except Exception as exc:  # noqa: BLE001 -- a logging sink must not stop training (network, service start-up, ...)
            say(f"wandb: could not start ({' '.join(str(exc).split())[:200]}); continuing without it")
            return None

    def log_step(self, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _finite_or_none(v) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps({**clean, "time": time.time()}) + "\n")  # unix seconds, wall clock
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in clean.items() if v is not None and k != "step"}, step=metrics["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
            self.bar.update(1)
        step = metrics["step"]
        if step % self.log_every == 0 or step == int(self.cfg.trainer.steps):
            load = (f" | load {metrics['moe/load_share_min']:.3f}-{metrics['moe/load_share_max']:.3f}"
                    if "moe/load_share_max" in metrics else "")  # expert shares of routed tokens (1/E: balanced)
            say(f"step {step:>6} | loss {metrics['loss']:.4f} | aux {metrics['aux_loss']:.4f} "
                f"| drop {metrics['drop_rate']:.3f}{load} | gnorm {metrics['grad_norm']:.3f} | lr {metrics['lr']:.3e} "
                f"| batch {metrics['global_batch_tokens']} tok | {metrics['tokens_per_s']:.0f} tok/s "
                f"| {metrics['tflops_per_device']:.2f} TFLOP/s | mfu {metrics['mfu']:.2%} "
                f"| mem {metrics['memory_gib']:.2f} GiB")

    def close(self, success: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=0 if success else 1)
            self.wandb_run = None

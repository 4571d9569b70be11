"""Atomic checkpoints: `<run_dir>/checkpoints/step_000123/` with a `complete` marker written last.

A checkpoint is written into `.tmp-step_000123/`, every file fsync'ed, the marker added, and the folder
renamed into place (`parallel.atomic_folder`), so a crash mid-save never leaves a `step_*` folder that loads.
Readers accept only `step_*` folders holding the marker; before loading, its files are checked against the
`checksums.json` manifest written before the marker (`parallel.checkpoint.verify_checkpoint`). The state itself
is torch DCP written by all ranks (`parallel.checkpoint.save_state`, layout-independent); `begin_save` /
`finish_save` are the two halves around that write (`trainer.layout.Layout.save_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from parallel.atomic_folder import MARKER, begin_folder, finish_folder, fsync_file, temp_folder

from .config import ConfigError

_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def temp_dir(root: Path, step: int) -> Path:
    """The temp folder checkpoint `step` is written into (`begin_save` creates it on rank 0)."""
    return temp_folder(Path(root) / step_dir_name(step))


def is_complete(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first; temp folders and folders without the marker are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def remove_temp_folders(root: Path) -> None:
    """Remove the temp folders left under `root` by a crash mid-save. Only while no save of this run is in flight:
    at the start (rank 0) and when a save begins (the previous one is complete by then)."""
    for stale in Path(root).glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def begin_save(root: Path, step: int) -> Path:
    """Create the empty temp folder of checkpoint `step` (removing leftovers of a crash mid-save); returns it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_temp_folders(root)
    return begin_folder(root / step_dir_name(step))


def finish_save(root: Path, step: int, tmp: Path, config_yaml: str, meta: dict, keep_last: int) -> Path:
    """Add config, meta and the marker to the written temp folder, rename it into place, prune old ones."""
    root = Path(root)
    final = root / step_dir_name(step)
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=1))
    for name in ("config.yaml", "meta.json"):
        fsync_file(tmp / name)
    # A run resumed from an earlier step leaves checkpoints of the abandoned branch at this step and later: keep
    # them, renamed out of resume=auto's reach, so the newest resumable checkpoint is always this run's own.
    for later in (c for c in complete_checkpoints(root) if _step_of(c) >= step):
        _set_aside(later)
    finish_folder(tmp, final)
    if keep_last > 0:
        # Only older checkpoints are pruned, never the one just written.
        older = [c for c in complete_checkpoints(root) if _step_of(c) < _step_of(final)]
        for old_ckpt in older[: max(len(older) - (keep_last - 1), 0)]:
            shutil.rmtree(old_ckpt, ignore_errors=True)
    return final


def _set_aside(ckpt_dir: Path) -> None:
    """Rename an abandoned branch's checkpoint to abandoned-step_N (-2, -3, ... after further roll-backs)."""
    target, n = ckpt_dir.parent / f"abandoned-{ckpt_dir.name}", 1
    while target.exists():
        n += 1
        target = ckpt_dir.parent / f"abandoned-{ckpt_dir.name}-{n}"
    os.replace(ckpt_dir, target)


def resume_candidates(resume: str, root: Path) -> list[Path]:
    """The checkpoint folders `trainer.resume` may load, preferred first; empty to start fresh. auto|require:
    every complete one in `root`, newest first (an older one is loaded when a newer fails verification);
    require fails when there is none (a requeued job must not start over); a path: that checkpoint."""
    if resume == "none":
        return []
    if resume in ("auto", "require"):
        found = complete_checkpoints(root)[::-1]
        if not found and resume == "require":
            raise ConfigError(f"trainer.resume=require: no complete checkpoint in {root}")
        return found
    return [_resume_path(resume)]


def resolve_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint folder that `trainer.resume` asks for first, or None to start fresh."""
    candidates = resume_candidates(resume, root)
    return candidates[0] if candidates else None


def _resume_path(resume: str) -> Path:
    path = Path(resume)
    if path.is_dir() and not _STEP_DIR.match(path.name):  # a checkpoints root or run dir: take its newest
        inner = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        newest = latest_checkpoint(inner)
        if newest is None:
            raise ConfigError(f"trainer.resume={resume}: no complete checkpoint in that folder")
        return newest
    if not is_complete(path):
        raise ConfigError(f"trainer.resume={resume}: not a complete checkpoint (missing folder or '{MARKER}' marker)")
    return path

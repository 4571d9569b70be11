"""Atomic folder writes with a `complete` marker, shared by `parallel.checkpoint` and `trainer.checkpoint`.

A folder `path` is written into `.tmp-<name>` next to it (`begin_folder`); `finish_folder` adds the marker
last (fsync'ed) and renames the temp folder into place, replacing an older `path`. A crash mid-save thus
never leaves a `path` without the marker; readers accept only folders holding it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MARKER = "complete"


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_folder(path: Path) -> Path:
    """Where folder `path` is written before it is complete."""
    path = Path(path)
    return path.parent / f".tmp-{path.name}"


def begin_folder(path: Path) -> Path:
    """Create the empty temp folder of `path` (removing a leftover of a crash mid-save); returns it."""
    tmp = temp_folder(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_folder(tmp: Path, path: Path) -> Path:
    """Add the marker to the written temp folder `tmp` and rename it to `path` (an older `path` is swapped out)."""
    path = Path(path)
    (tmp / MARKER).write_text("")
    fsync_file(tmp / MARKER)
    fsync_dir(tmp)
    if path.exists():  # re-saving: swap, then drop the old one
        old = path.parent / f".old-{path.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path

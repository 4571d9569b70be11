"""Atomic folder writes with a `complete` marker, shared by `parallel.checkpoint` and `trainer.checkpoint`.

A folder `path` is written into `.tmp-<name>` next to it (`begin_folder`); `finish_folder` adds the marker
last (fsync'ed) and renames the temp folder into place, replacing an older `path`. A crash mid-save thus
never leaves a `path` without the marker; readers accept only folders holding it.

Before the marker, `finish_folder` writes the manifest `checksums.json`: size and CRC-32 of every file of the
folder. Writers of large files checksum them where they wrote them (`write_checksums_part`, e.g. each rank its
shards) and `finish_folder` merges those parts, checksumming only the files no part covers. `file_problem`
checks one file against its manifest entry.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

MARKER = "complete"
MANIFEST = "checksums.json"
_PART = "checksums-{}.json"  # one writer's checksums, merged into MANIFEST by finish_folder
_READ_BYTES = 4 << 20  # zlib's CRC-32 runs at ~3.4 GB/s a core over 4 MiB reads (blake2b: ~0.8 GB/s)


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


def checksum(path: Path) -> dict:
    """{"size": bytes, "crc32": hex} of a file."""
    crc, size, buf = 0, 0, bytearray(_READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc, size = zlib.crc32(view[:n], crc), size + n
    return {"size": size, "crc32": f"{crc:08x}"}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))
    fsync_file(path)


def write_checksums_part(folder: Path, names, writer: str) -> None:
    """Checksums of the files `names` of `folder`, recorded by the process that wrote them (`writer` names the
    part); `finish_folder` merges the parts into the manifest."""
    folder = Path(folder)
    _write_json(folder / _PART.format(writer), {name: checksum(folder / name) for name in names})


def write_manifest(folder: Path) -> None:
    """The manifest of every file of `folder`: the parts' checksums merged, the rest computed here."""
    parts = sorted(folder.glob(_PART.format("*")))
    files = {}
    for part in parts:
        files.update(json.loads(part.read_text()))
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in files and path not in parts and path.name not in (MARKER, MANIFEST):
            files[path.name] = checksum(path)
    _write_json(folder / MANIFEST, {"algorithm": "crc32", "files": dict(sorted(files.items()))})
    for part in parts:
        part.unlink()


def read_manifest(folder: Path) -> dict | None:
    """{file name: {"size", "crc32"}} from the folder's manifest; None when it has none (written before
    manifests existed). ValueError when the manifest itself is unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        return {str(name): {"size": int(e["size"]), "crc32": str(e["crc32"])} for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{MANIFEST} is unreadable") from None


def file_problem(folder: Path, name: str, expected: dict) -> str | None:
    """What is wrong with file `name` of `folder` against its manifest entry, or None (never raises: the
    ranks checking a folder together must all reach their agreement)."""
    path = Path(folder) / name
    if not path.is_file():
        return f"{name} is missing"
    try:
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} expected"
        return None if checksum(path)["crc32"] == expected["crc32"] else f"{name} checksum mismatch"
    except OSError as exc:
        return f"{name} is unreadable ({exc.strerror or exc})"


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
    """Write the manifest and the marker into the written temp folder `tmp` and rename it to `path` (an older
    `path` is swapped out)."""
    path = Path(path)
    write_manifest(tmp)
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

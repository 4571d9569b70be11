"""Open a corpus as an HF `datasets` dataset from the `data` config.

    source: default   the corpus shipped in data/assets (no network)
    source: files     local files: `path` is a file, a folder (searched recursively), a glob, or a
                      list of those; the format comes from the extension (.txt/.md, .jsonl/.json,
                      .parquet, .csv, .arrow, optionally compressed .gz/.bz2/.xz/.zst)
    source: hub       `path` is a hub dataset name, with optional `name` and `split`
                      (needs network or the HF cache)

`streaming: true` returns an `IterableDataset` read in order; otherwise a map-style `Dataset`.
`sample_by` (line | paragraph | document) says what one document of a .txt file is.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Mapping
from pathlib import Path

from data.errors import ConfigError

DEFAULT_CORPUS = Path(__file__).resolve().parent / "assets" / "default_corpus.jsonl.gz"
FORMATS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "json", ".json": "json",
    ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SOURCES = ("default", "files", "hub")


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def file_format(path: Path) -> str | None:
    """The `datasets` builder for a file by its extension, or None if it is not a corpus file."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def resolve_files(path_setting) -> tuple[list[str], str]:
    """Expand `data.path` into a sorted file list and the one format they share."""
    if path_setting is None or (isinstance(path_setting, str) and not path_setting.strip()):
        raise ConfigError("data.path: not set (source: files needs a file, folder or glob)")
    patterns = [path_setting] if isinstance(path_setting, (str, Path)) else list(path_setting)
    files: list[Path] = []
    for pattern in map(str, patterns):
        expanded = Path(pattern).expanduser()
        if any(c in pattern for c in "*?["):  # a glob
            matches = [Path(p) for p in glob.glob(str(expanded), recursive=True)]
            if not matches:
                raise ConfigError(f"data.path: no file matches {pattern}")
            files += [p for p in matches if p.is_file()]
        elif expanded.is_dir():
            found = [p for p in expanded.rglob("*") if p.is_file() and file_format(p)
                     and not any(part.startswith(".") for part in p.relative_to(expanded).parts)]
            if not found:
                raise ConfigError(f"data.path: {pattern} holds no {'/'.join(sorted(FORMATS))} files")
            files += found
        elif expanded.is_file():
            files.append(expanded)
        else:
            raise ConfigError(f"data.path: {pattern} does not exist")
    files = sorted(set(files))  # a fixed order, so every rank and every run sees the same documents
    formats = {file_format(p) for p in files}
    if None in formats:
        unknown = next(p for p in files if file_format(p) is None)
        raise ConfigError(f"data.path: cannot tell the format of {unknown} from its extension "
                          f"(known: {', '.join(sorted(FORMATS))})")
    if len(formats) > 1:
        raise ConfigError(f"data.path: files of several formats ({', '.join(sorted(formats))}); use one")
    return [str(p) for p in files], formats.pop()


def load_default_corpus():
    """The shipped corpus, read straight into memory (a few MB): no cache files, no locks."""
    from datasets import Dataset

    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for line in lines]
    return Dataset.from_dict({"text": texts})


def _load_files(cfg: Mapping):
    from datasets import load_dataset

    files, fmt = resolve_files(cfg.get("path"))
    kwargs = {"sample_by": cfg.get("sample_by", "document") or "document"} if fmt == "text" else {}
    try:
        return load_dataset(fmt, data_files=files, split="train",
                            streaming=bool(cfg.get("streaming", False)), **kwargs)
    except Exception as error:  # noqa: BLE001 -- datasets wraps parse errors in several exception types
        raise ConfigError(f"data.path: cannot read {cfg.get('path')} as {fmt}: {_first_line(error)}") from None


def _load_hub(cfg: Mapping):
    from datasets import load_dataset

    name = cfg.get("path")
    if not name:
        raise ConfigError("data.path: not set (source: hub needs a dataset name)")
    try:
        return load_dataset(str(name), cfg.get("name"), split=cfg.get("split") or "train",
                            streaming=bool(cfg.get("streaming", False)))
    except Exception as error:  # noqa: BLE001 -- offline, unknown name, unknown split, ...
        raise ConfigError(f"data.path: cannot load hub dataset '{name}': {_first_line(error)}") from None


def load_corpus(cfg: Mapping):
    """Open the corpus that `cfg` (the `data` config) describes; checks that the text column exists."""
    from datasets import Dataset

    source = cfg.get("source", "default") or "default"
    if source not in SOURCES:
        raise ConfigError(f"data.source: must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "default":
        dataset = load_default_corpus()
    elif source == "files":
        dataset = _load_files(cfg)
    else:
        dataset = _load_hub(cfg)
    text_field = cfg.get("text_field", "text") or "text"
    columns = dataset.column_names  # None for some streaming datasets until read
    if columns is not None:
        if text_field not in columns:
            raise ConfigError(f"data.text_field: no column {text_field!r} in {cfg.get('path') or source} "
                              f"(columns: {', '.join(columns)})")
        dataset = dataset.select_columns([text_field])
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ConfigError(f"data.path: {cfg.get('path') or source} holds no documents")
    return dataset

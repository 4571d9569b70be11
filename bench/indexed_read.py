"""Indexed-corpus read benchmark: window assembly of data.source=indexed from the page cache, one process.

    python bench/indexed_read.py [--tokens 100000000] [--mean-doc 600] [--seconds 2] [--dir /tmp/indexed_bench]

1. writes a synthetic corpus with megatron-core's IndexedDatasetBuilder: uint16 token ids (a 4K vocabulary), document
   lengths lognormal around --mean-doc tokens, EOS last; as 16 shards in a folder (data.prepare's layout), the
   same documents merged into one prefix (IndexedDatasetBuilder.add_index), and a corpus of 50-token documents;
2. syncs, then reads every .bin once, so that the timed reads come from the page cache;
3. times `next_window()` of one sub-stream (data.indexed.IndexedWindowStream, or the blend's MixtureStream) for
   seq_len 2K / 8K / 32K, short documents, the 16-shard folder, a 0.5/0.5 blend, data.streams=64 and a document
   length filter; tokens/s = seq_len x windows / seconds, read twice: first from a fresh memory map (each page's
   first touch, served from the page cache), then the same windows again (tokens_per_s). "setup_s" is opening the
   corpus and the first epoch's order;
4. for scale, the on-the-fly path (tokenize + pack, the shipped corpus and tokenizer) at 8K.
Prints the table last; writes bench/results/indexed_read.json (and $OUT/ when set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import DataSource, build_tokenizer
from data.indexed import megatron_indexed

SHARDS = 16


def write_corpus(folder: Path, tokens: int, mean_doc: int, eos: int, seed: int) -> int:
    """SHARDS prefixes in `folder` holding about `tokens` tokens; returns the document count."""
    indexed, rng = megatron_indexed(), np.random.default_rng(seed)
    sigma = 1.0
    lengths = np.maximum(2, rng.lognormal(np.log(mean_doc) - sigma ** 2 / 2, sigma, int(tokens / mean_doc * 1.05)))
    lengths = lengths.astype(np.int64)[: int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]
    ids = rng.integers(1, 4096, int(lengths.sum()), dtype=np.uint16)
    ends = np.cumsum(lengths)
    ids[ends - 1] = eos
    folder.mkdir(parents=True, exist_ok=True)
    for k, docs in enumerate(np.array_split(np.arange(len(lengths)), SHARDS)):
        builder = indexed.IndexedDatasetBuilder(str(folder / f"{k:05d}-of-{SHARDS:05d}.bin"), dtype=np.uint16)
        for d in docs.tolist():
            builder.add_document(ids[ends[d] - lengths[d]:ends[d]], [int(lengths[d])])
        builder.finalize(str(folder / f"{k:05d}-of-{SHARDS:05d}.idx"))
    return len(lengths)


def merge(folder: Path, prefix: Path) -> None:
    builder = megatron_indexed().IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for k in range(SHARDS):
        builder.add_index(str(folder / f"{k:05d}-of-{SHARDS:05d}"))
    builder.finalize(f"{prefix}.idx")


def warm_page_cache(root: Path) -> int:
    size = 0
    for path in sorted(root.rglob("*.bin")):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                size += len(chunk)
    return size


def time_windows(stream, seq_len: int, seconds: float | None = None, windows: int | None = None) -> dict:
    """Read windows for `seconds` (at least 20), or exactly `windows` of them."""
    count, documents, started = 0, 0, time.perf_counter()
    while (count < windows) if windows else ((elapsed := time.perf_counter() - started) < seconds or count < 20):
        documents += len(stream.next_window()["cu_seqlens"]) - 1
        count += 1
    elapsed = time.perf_counter() - started
    return {"windows": count, "docs_per_window": documents / count, "us_per_window": elapsed / count * 1e6,
            "tokens_per_s": count * seq_len / elapsed}


def bench_row(name: str, cfg: dict, tokenizer, seq_len: int, seconds: float) -> dict:
    """Windows from a fresh memory map (each page's first touch, from the page cache), then the same windows
    again (`tokens_per_s`: the pages mapped already)."""
    started = time.perf_counter()
    stream = DataSource(cfg, tokenizer, seq_len).stream(0)
    setup = time.perf_counter() - started
    start = stream.state_dict()
    first = time_windows(stream, seq_len, seconds=seconds)
    stream.load_state_dict(start)
    row = {"bench": name, "seq_len": seq_len, "setup_s": setup, "first_touch_tokens_per_s": first["tokens_per_s"],
           **time_windows(stream, seq_len, windows=first["windows"])}
    print(json.dumps(row), flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    keys = ["bench", "seq_len", "docs_per_window", "us_per_window", "tokens_per_s", "first_touch_tokens_per_s",
            "setup_s"]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000_000, help="tokens of the main corpus")
    ap.add_argument("--mean-doc", type=int, default=600, help="mean document length in tokens")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per row")
    ap.add_argument("--dir", default=None, help="where the corpora go (default: a temporary folder, removed)")
    args = ap.parse_args()
    tokenizer = build_tokenizer("default")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.dir or scratch)
        started = time.perf_counter()
        documents = write_corpus(root / "shards", args.tokens, args.mean_doc, tokenizer.eos_id, seed=0)
        merge(root / "shards", root / "merged")
        write_corpus(root / "short", args.tokens // 5, 50, tokenizer.eos_id, seed=1)
        write_corpus(root / "other", args.tokens // 5, args.mean_doc, tokenizer.eos_id, seed=2)
        written = time.perf_counter() - started
        os.sync()  # no write-back of the new files while timing
        cached = warm_page_cache(root)
        print(f"wrote {documents:,} documents ({args.tokens:,} tokens) and the other corpora in {written:.1f} s; "
              f"{cached / 2**30:.2f} GiB read into the page cache", flush=True)

        merged, one = str(root / "merged"), {"source": "indexed", "streams": 1, "seed": 0}
        rows = [bench_row("one prefix", {**one, "path": merged}, tokenizer, s, args.seconds)
                for s in (2048, 8192, 32768)]
        rows += [
            bench_row("50-token documents", {**one, "path": str(root / "short")}, tokenizer, 8192, args.seconds),
            bench_row(f"{SHARDS} shards (folder)", {**one, "path": str(root / "shards")}, tokenizer, 8192,
                      args.seconds),
            bench_row("blend 0.5/0.5", {**one, "path": f"0.5 {merged} 0.5 {root / 'other'}"}, tokenizer, 8192,
                      args.seconds),
            bench_row("data.streams=64", {**one, "path": merged, "streams": 64}, tokenizer, 8192, args.seconds),
            bench_row("min_doc_tokens=1000", {**one, "path": merged, "min_doc_tokens": 1000}, tokenizer, 8192,
                      args.seconds),
            bench_row("on the fly (tokenize + pack)", {"source": "default", "streams": 1}, tokenizer, 8192,
                      args.seconds),
        ]
    result = {"corpus_tokens": args.tokens, "mean_doc": args.mean_doc, "python": platform.python_version(),
              "numpy": np.__version__, "cpus": os.cpu_count(), "machine": platform.machine(), "rows": rows}
    text = json.dumps(result, indent=1)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "indexed_read.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "indexed_read.json").write_text(text)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()

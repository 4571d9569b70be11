"""`python -m data.prepare [data overrides] out=<prefix or folder> [data.prepare.workers=N] [data.prepare.shards=M]`

Tokenizes a text corpus once into megatron-core's indexed format (`IndexedDatasetBuilder`), to train on with
`data.source=indexed data.path=<out>` (data/indexed.py). The data settings are the trainer's, composed from conf/
with the same overrides (`data=files data.path=/corpus/ data.tokenizer=...`), and so is the tokenization: a
document's tokens, no BOS, then EOS. Each document of the source becomes one document of the index, in the
source's order (an empty one is EOS alone and is skipped when read, as on the fly), so document i is row i and
the windows are the on-the-fly ones.

The corpus is cut into `shards` runs of documents (default 4 per worker; a streamed corpus is cut at its files
when it has as many, else every shards-th document goes to a shard). `workers` processes (default: the CPUs) each
write whole shards to `<out>-SSSSS-of-NNNNN.bin/.idx`, or `<out>/SSSSS-of-NNNNN.*` when out is a folder (an
existing one, or ending in /), under a temporary name renamed when complete. After an interruption, the same
command keeps the finished shards and writes the others. Bad input: one line, exit code 2.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

from data.corpus import SOURCES, load_corpus
from data.documents import _as_text
from data.errors import ConfigError
from data.indexed import is_folder, megatron_indexed, shard_prefix
from data.tokenizer import build_tokenizer

SETTINGS = ("source", "path", "name", "split", "streaming", "text_field", "sample_by", "tokenizer")  # the content
SHARDS_PER_WORKER = 4  # some load balance, and less to redo after an interruption
BATCH = 512  # documents per tokenizer call and progress report


def parse_args(argv: list[str]) -> tuple[list[str], str, int, int | None]:
    """(Hydra overrides for the trainer's config, out, workers, shards or None) from the command line."""
    overrides, out, shards = [], None, None
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "out":
            out = value
        elif key == "data.prepare.workers":
            workers = _count(value, key)
        elif key == "data.prepare.shards":
            shards = None if value in ("", "null", "auto") else _count(value, key)
        elif key.startswith("data.prepare."):
            raise ConfigError(f"{key}: unknown setting (data.prepare.workers, data.prepare.shards)")
        else:
            overrides.append(arg)
    if not out:
        raise ConfigError("out: not set (python -m data.prepare [data overrides] out=<prefix or folder>)")
    return overrides, out, workers, shards


def _count(value: str, key: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    return int(value)


# -- one shard -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _opened(settings_json: str):
    """The tokenizer and corpus of a worker (the main process built datasets' cache: a cheap reopen)."""
    settings = json.loads(settings_json)
    return build_tokenizer(settings["tokenizer"]), load_corpus(settings)


def _shard_texts(dataset, text_field: str, shard: int, shards: int) -> Iterator[list[str]]:
    """The texts of shard `shard` of `shards`, a batch at a time, in the corpus's order."""
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    if not isinstance(dataset, IterableDataset):
        part = dataset.shard(num_shards=shards, index=shard, contiguous=True)
        for start in range(0, len(part), BATCH):
            yield [_as_text(t, text_field) for t in part[start:start + BATCH][text_field]]
        return
    if dataset.num_shards >= shards:  # whole files, in order
        part = dataset.shard(num_shards=shards, index=shard, contiguous=True)
    else:  # fewer files than shards: every shards-th document
        part = split_dataset_by_node(dataset, rank=shard, world_size=shards)
    batch = []
    for row in part:
        if text_field not in row:
            raise ConfigError(f"data.text_field: no column {text_field!r} (columns: {', '.join(row)})")
        batch.append(_as_text(row[text_field], text_field))
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def write_shard(settings: dict, shard: int, shards: int, prefix: str, report: Callable[[int, int], None]) -> dict:
    """Tokenize shard `shard` into `<prefix>.bin/.idx`, written as `<prefix>.partial.*` and renamed when done."""
    tokenizer, dataset = _opened(json.dumps(settings, sort_keys=True))
    indexed = megatron_indexed()
    dtype = indexed.DType.optimal_dtype(tokenizer.vocab_size)  # as Megatron's preprocess_data.py picks it
    partial = prefix + ".partial"
    builder = indexed.IndexedDatasetBuilder(partial + ".bin", dtype=dtype)
    started, cpu_started, documents, tokens = time.perf_counter(), time.process_time(), 0, 0
    for texts in _shard_texts(dataset, settings["text_field"] or "text", shard, shards):
        batch_tokens = 0
        for ids in tokenizer.encode_batch(texts):
            document = np.empty(len(ids) + 1, dtype=dtype)
            document[:-1] = ids
            document[-1] = tokenizer.eos_id
            builder.add_document(document, [len(document)])
            batch_tokens += len(document)
        documents, tokens = documents + len(texts), tokens + batch_tokens
        report(len(texts), batch_tokens)
    builder.finalize(partial + ".idx")
    for ext in (".bin", ".idx"):  # the .idx last: a shard is complete once its .idx has its final name
        with open(partial + ext, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial + ext, prefix + ext)
    return {"shard": shard, "documents": documents, "tokens": tokens, "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started}


_reports = None  # a worker process's queue to the progress bar


def _init_worker(reports) -> None:
    global _reports
    _reports = reports
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


def _write_shard_in_worker(args: tuple) -> dict:
    return write_shard(*args, report=lambda documents, tokens: _reports.put((documents, tokens)))


# -- the run -------------------------------------------------------------------------------------

def _shard_size(prefix: str) -> tuple[int, int]:
    """(documents, tokens) of a finished shard."""
    if os.path.getsize(prefix + ".bin") == 0:  # a shard without documents (memory maps cannot be empty)
        return 0, 0
    dataset = megatron_indexed().IndexedDataset(prefix)
    return len(dataset.document_indices) - 1, int(dataset.sequence_lengths.sum(dtype=np.int64))


def _record_settings(path: str, manifest: dict, out: str) -> None:
    """Shards finished in `out` must come from the same settings and shard count; the run records its own."""
    before = None
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
    if before == manifest:
        return
    if before and any(os.path.isfile(shard_prefix(out, k, before["shards"]) + ".idx") for k in range(before["shards"])):
        if before["shards"] != manifest["shards"]:
            raise ConfigError(f"data.prepare.shards={manifest['shards']}: {out} holds a run of {before['shards']} "
                              f"shards; finish it with data.prepare.shards={before['shards']} or choose another out")
        key = next(k for k, v in manifest["data"].items() if before["data"].get(k) != v)
        raise ConfigError(f"out: {out} holds shards of other data settings (data.{key}={before['data'].get(key)!r}, "
                          f"now {manifest['data'][key]!r}); choose another out or remove them")
    with open(path + ".partial", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".partial", path)


def _write_shards(tasks: list[tuple], workers: int, on_progress: Callable, on_shard: Callable) -> None:
    """`write_shard(*task)` for every task, in this process (one worker) or in `workers` processes."""
    if workers <= 1:
        for task in tasks:
            on_shard(write_shard(*task, report=on_progress))
        return
    # spawned, not forked: no tokenizer thread pool or datasets state copied from this process
    context = multiprocessing.get_context("spawn")
    reports = context.Queue()
    with context.Pool(workers, initializer=_init_worker, initargs=(reports,)) as pool:
        running = [pool.apply_async(_write_shard_in_worker, (task,), callback=on_shard) for task in tasks]
        while not all(r.ready() for r in running) or not reports.empty():
            try:
                on_progress(*reports.get(timeout=0.2))
            except queue.Empty:
                pass
            for r in running:
                if r.ready() and not r.successful():
                    r.get()  # raises the worker's exception (the pool is terminated on the way out)


def prepare(argv: list[str]) -> int:
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from trainer.config import compose_config

    overrides, out, workers, shards = parse_args(argv)
    data_cfg = OmegaConf.to_container(compose_config(overrides).data, resolve=True)
    source = data_cfg.get("source") or "default"
    if source not in SOURCES:
        already = " (indexed is tokenized already)" if source == "indexed" else ""
        raise ConfigError(f"data.source: prepare reads {', '.join(SOURCES)}, got {source!r}{already}")
    settings = {key: data_cfg.get(key) for key in SETTINGS}
    settings["source"] = source
    build_tokenizer(settings["tokenizer"])  # bad tokenizer: fails here, not in every worker
    dataset = load_corpus(settings)
    rows = None if settings["streaming"] else len(dataset)

    if is_folder(out):
        os.makedirs(out, exist_ok=True)
        manifest_path = os.path.join(out, "prepare.json")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        manifest_path = out + ".prepare.json"
    if shards is None and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            shards = json.load(f)["shards"]
    shards = shards or SHARDS_PER_WORKER * workers
    if rows is not None:
        shards = min(shards, rows)  # no empty shard
    _record_settings(manifest_path, {"shards": shards, "data": settings}, out)

    prefixes = [shard_prefix(out, k, shards) for k in range(shards)]
    pending = [k for k, prefix in enumerate(prefixes) if not os.path.isfile(prefix + ".idx")]
    kept = [_shard_size(prefix) for k, prefix in enumerate(prefixes) if k not in pending]
    bar = tqdm(total=rows, initial=sum(d for d, _ in kept), unit="doc", unit_scale=True, desc="prepare",
               file=sys.stderr, disable=None)
    if kept:
        bar.write(f"{out}: {len(kept)} of {shards} shards are done already, {len(pending)} to write")
    started, new_tokens, results = time.perf_counter(), 0, []  # new_tokens: for the live rate only

    def on_progress(documents: int, tokens: int) -> None:
        nonlocal new_tokens
        new_tokens += tokens
        bar.update(documents)
        bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - started):,.0f} tok/s", refresh=False)

    def on_shard(result: dict) -> None:
        results.append(result)
        bar.write(f"shard {result['shard']} done ({len(results)}/{len(pending)}): {result['documents']:,} "
                  f"documents, {result['tokens']:,} tokens, {result['tokens'] / result['seconds']:,.0f} tok/s")

    tasks = [(settings, k, shards, prefixes[k]) for k in pending]
    workers = min(workers, len(tasks))
    _write_shards(tasks, workers, on_progress, on_shard)
    bar.close()

    wall = time.perf_counter() - started
    documents = sum(d for d, _ in kept) + sum(r["documents"] for r in results)
    tokens = sum(t for _, t in kept) + sum(r["tokens"] for r in results)
    print(f"prepared {out}: {shards} shards ({len(results)} written now), {documents:,} documents, {tokens:,} tokens")
    if results:
        written, busy = sum(r["tokens"] for r in results), sum(r["seconds"] for r in results)
        cpu = sum(r["cpu_seconds"] for r in results)
        print(f"this run: {written:,} tokens in {wall:.1f} s, {written / wall:,.0f} tokens/s with {workers} "
              f"worker(s); per worker {written / busy:,.0f} tokens/s ({written / cpu:,.0f} per CPU second)")
    tokenizer = "" if settings["tokenizer"] == "default" else f" data.tokenizer={settings['tokenizer']}"
    print(f"train on it: python -m trainer.train data=indexed data.path={out}{tokenizer}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from trainer.config import command_line

    try:
        return command_line(__doc__, argv, prepare)
    except KeyboardInterrupt:
        print("interrupted: the finished shards are kept; run the same command again to write the others",
              file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())

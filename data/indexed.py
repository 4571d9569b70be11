"""`data.source: indexed`: corpora tokenized ahead of time into megatron-core's indexed format, read memory-mapped.

`python -m data.prepare` writes them (or Megatron-LM's tools/preprocess_data.py with --append-eod and the same
tokenizer). `data.path` follows Megatron's convention, as a string or a list:

    /data/web                        a prefix (/data/web.bin + .idx), a folder of prefixes, a glob, or the
                                     shards python -m data.prepare wrote for out=/data/web
    "/data/web /data/code"           several, read as one corpus (their documents in this order)
    "0.7 /data/web 0.3 /data/code"   a blend: each window comes whole from one of them, drawn by weight

A document is one document of the index (its sequences in a row) and ends with EOS, as the on-the-fly path
appends it. Documents are ordered (`data.documents.epoch_order`), filtered and packed exactly as `WindowStream`
does a map-style text corpus, so a prepared corpus gives the windows of its source token for token and the
saved position (epoch, document index, token offset) is the same. A window is assembled from per-document slices
of the memory map: numpy per document, nothing per token.
"""

from __future__ import annotations

import glob
import math
import os
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from data.documents import NO_HOLDOUT, Holdout, epoch_order
from data.errors import ConfigError, positive_int
from data.mixture import MixtureStream
from data.packing import IGNORE_INDEX, check_holdout, doc_token_range, holdout_state, nothing_accepted_message

SHARD = re.compile(r"(?P<index>\d{5})-of-(?P<count>\d{5})$")  # the name end of a shard of data.prepare
INDEX_HEADER = b"MMIDIDX\x00\x00"  # the first bytes of every .idx megatron-core writes
EOS_SAMPLE = 16  # documents checked for the EOS and the vocabulary when a prefix is opened


def megatron_indexed():
    """megatron-core's indexed_dataset module (its package import warns that apex and Transformer Engine are
    missing, which does not matter here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def shard_prefix(out: str, index: int, count: int) -> str:
    """The prefix of shard `index` of `count` that data.prepare writes for `out` (a folder or a prefix)."""
    name = f"{index:05d}-of-{count:05d}"
    return os.path.join(out, name) if is_folder(out) else f"{out}-{name}"


def is_folder(out: str) -> bool:
    return out.endswith(os.sep) or os.path.isdir(out)


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# -- data.path -----------------------------------------------------------------------------------

def _is_number(item: str) -> bool:
    try:
        float(item)
    except ValueError:
        return False
    return True


def parse_data_path(setting) -> list[tuple[float | None, str]]:
    """[(weight or None, entry)] from `data.path`: prefixes, or pairs of weight and prefix summing to 1."""
    if isinstance(setting, (str, Path)):
        items = str(setting).split()
    elif isinstance(setting, Sequence):  # a list, also OmegaConf's
        items = [part for item in setting for part in str(item).split()]
    else:
        items = []
    if not items:
        raise ConfigError(f"data.path: not set (source: indexed needs one or more prefixes written by python -m "
                          f"data.prepare), got {setting!r}")
    numbers = [_is_number(item) for item in items]
    if not any(numbers):
        return [(None, item) for item in items]
    if len(items) % 2 or not all(numbers[0::2]) or any(numbers[1::2]):
        raise ConfigError(f"data.path: expected prefixes or pairs of weight and prefix "
                          f"('0.7 /data/a 0.3 /data/b'), got {' '.join(items)!r}")
    pairs = [(float(w), entry) for w, entry in zip(items[0::2], items[1::2])]
    weights = [w for w, _ in pairs]
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise ConfigError(f"data.path: the weights must be non-negative and sum to 1, got "
                          f"{', '.join(f'{w:g}' for w in weights)} (sum {sum(weights):g})")
    entries = [entry for _, entry in pairs]
    twice = sorted({e for e in entries if entries.count(e) > 1})
    if twice:
        raise ConfigError(f"data.path: {', '.join(twice)} appears more than once")
    return pairs


def resolve_prefixes(entry: str) -> list[str]:
    """The prefixes an entry of data.path names, in a fixed order. The shards of data.prepare in a folder or for
    a prefix must all be there (a glob may pick some)."""
    path, picked = os.path.expanduser(entry), False
    if os.path.isfile(path + ".idx"):
        found = [path]
    elif os.path.isdir(path):
        found = sorted(p[:-4] for p in glob.glob(os.path.join(glob.escape(path), "*.idx")))
    elif any(c in entry for c in "*?["):  # matching the prefixes or their files
        candidates = {match.removesuffix(".idx") for match in glob.glob(path)}
        found, picked = sorted(p for p in candidates if os.path.isfile(p + ".idx")), True
    else:
        found = sorted(p[:-4] for p in glob.glob(glob.escape(path) + "-[0-9]*-of-[0-9]*.idx"))
    found = [p for p in found if not os.path.basename(p).startswith(".") and not p.endswith(".partial")]
    if not found:
        raise ConfigError(f"data.path: {entry}: no indexed corpus there (no {entry}.idx, folder, glob match or "
                          f"shards of python -m data.prepare)")
    for prefix in found:
        if not os.path.isfile(prefix + ".bin"):
            raise ConfigError(f"data.path: {prefix}.bin is missing (its .idx is there)")
    shard_sets: dict[tuple[str, int], int] = {}
    for prefix in [] if picked else found:
        match = SHARD.search(prefix)
        if match:
            key = (prefix[:match.start()], int(match["count"]))
            shard_sets[key] = shard_sets.get(key, 0) + 1
    for (base, count), present in shard_sets.items():
        if present != count:
            raise ConfigError(f"data.path: {entry} holds {present} of the {count} shards of {base or './'} (an "
                              f"unfinished python -m data.prepare: run it again to finish)")
    return found


# -- corpora -------------------------------------------------------------------------------------

class _Prefix:
    """One `<prefix>.bin/.idx` opened with megatron-core's IndexedDataset. Its arrays are views of the memory maps
    (no copy per document or token), valid while `dataset` lives: it closes the maps when it goes."""

    def __init__(self, prefix: str):
        with open(prefix + ".idx", "rb") as f:
            header = f.read(len(INDEX_HEADER))
        if header != INDEX_HEADER:  # (IndexedDataset would fail half-built, and then fail again in __del__)
            raise ConfigError(f"data.path: {prefix}.idx is not an index of megatron-core's indexed format")
        try:
            self.dataset = megatron_indexed().IndexedDataset(prefix)
        except (AssertionError, ValueError, OSError, struct.error) as error:
            raise ConfigError(f"data.path: cannot read {prefix}.idx/.bin in megatron-core's indexed format: "
                              f"{_first_line(error)}") from None
        index = self.dataset.index
        self.prefix, self.dtype, self.itemsize = prefix, index.dtype, np.dtype(index.dtype).itemsize
        lengths, documents = index.sequence_lengths, index.document_indices
        self.num_tokens = int(lengths.sum(dtype=np.int64))
        size = os.path.getsize(prefix + ".bin")
        if size != self.num_tokens * self.itemsize:
            raise ConfigError(f"data.path: {prefix}.bin holds {size} bytes, its index says "
                              f"{self.num_tokens * self.itemsize} (a file cut short?)")
        self._bounds = None  # one sequence per document (data.prepare; Megatron without --split-sentences)
        if not _is_range(documents, len(lengths)):  # several sequences (sentences) per document, in a row
            self._bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])[documents]
        self.num_documents = len(documents) - 1
        # every token of the .bin: a view of the memory map, like the index arrays (never handed out: windows copy)
        self.tokens = self.dataset.bin_reader.read(dtype=self.dtype, count=self.num_tokens, offset=0)

    def documents(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first token in the .bin, token count) of documents `local` of this prefix, int64."""
        if self._bounds is None:
            index = self.dataset.index
            return index.sequence_pointers[local] // self.itemsize, index.sequence_lengths[local].astype(np.int64)
        return self._bounds[local], self._bounds[local + 1] - self._bounds[local]


def _is_range(values: np.ndarray, stop: int, chunk: int = 1 << 22) -> bool:
    """values == arange(stop + 1), compared a chunk at a time (an index may hold billions of documents)."""
    return len(values) == stop + 1 and all(np.array_equal(values[i:i + chunk], np.arange(i, min(i + chunk, stop + 1)))
                                            for i in range(0, stop + 1, chunk))


class IndexedCorpus:
    """Prefixes read as one corpus, their documents in order. `tokenizer` (eos_id, vocab_size) is the one the
    run trains with: a sample of documents must end with its EOS and hold only ids of its vocabulary."""

    def __init__(self, prefixes: list[str], tokenizer, where: str):
        # an empty .bin holds no token, hence no document to read (memory maps cannot be empty)
        self.prefixes = [_Prefix(p) for p in prefixes if os.path.getsize(p + ".bin") > 0]
        self.first_document = np.cumsum([0] + [p.num_documents for p in self.prefixes])
        self.num_documents = int(self.first_document[-1])
        if self.num_documents == 0:
            raise ConfigError(f"data.path: {where} holds no documents")
        self._check_tokens(tokenizer)

    def _check_tokens(self, tokenizer) -> None:
        eos, vocab = tokenizer.eos_id, getattr(tokenizer, "vocab_size", None)
        for prefix in self.prefixes:
            sample = np.unique(np.linspace(0, prefix.num_documents - 1, EOS_SAMPLE).astype(np.int64))
            for doc, start, length in zip(sample.tolist(), *(a.tolist() for a in prefix.documents(sample))):
                if length == 0:
                    continue
                tokens = prefix.tokens[start:start + length]
                if tokens[-1] != eos:
                    raise ConfigError(f"data.path: document {doc} of {prefix.prefix} does not end with EOS "
                                      f"({eos} in data.tokenizer): write it with python -m data.prepare, or "
                                      f"Megatron's preprocess_data.py --append-eod, and this tokenizer")
                if vocab is not None and int(tokens.max()) >= vocab:
                    raise ConfigError(f"data.path: document {doc} of {prefix.prefix} holds token "
                                      f"{int(tokens.max())}, outside data.tokenizer's vocabulary of {vocab}")

    def documents(self, ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(prefix number or None for one prefix, first token in its .bin, token count) of documents `ids`."""
        if len(self.prefixes) == 1:
            return None, *self.prefixes[0].documents(ids)
        owner = (np.searchsorted(self.first_document, ids, side="right") - 1).astype(np.int32)
        starts, lengths = np.empty(len(ids), np.int64), np.empty(len(ids), np.int64)
        by_owner = np.argsort(owner, kind="stable")  # one pass per prefix over its own documents only
        edges = np.searchsorted(owner[by_owner], np.arange(len(self.prefixes) + 1))
        for k, prefix in enumerate(self.prefixes):
            rows = by_owner[edges[k]:edges[k + 1]]
            local = ids[rows] - self.first_document[k]
            starts[rows], lengths[rows] = prefix.documents(local)
        return owner, starts, lengths

    def gather(self, out: np.ndarray, owners: np.ndarray | None, sources: np.ndarray, counts: np.ndarray) -> None:
        """Fill `out` with runs of `counts` tokens from token `sources` of the .bin of prefixes `owners` (None: the
        only prefix): a slice copy per document, about a microsecond each."""
        at = 0
        for k, source, count in zip([0] * len(counts) if owners is None else owners.tolist(), sources.tolist(),
                                    counts.tolist()):
            out[at:at + count] = self.prefixes[k].tokens[source:source + count]
            at += count


class IndexedSource:
    """`data.path` opened: one corpus, or a blend of corpora by weight (`stream` builds a sub-stream of it)."""

    def __init__(self, path_setting, tokenizer):
        entries = parse_data_path(path_setting)
        if entries[0][0] is None:
            prefixes = [p for _, entry in entries for p in resolve_prefixes(entry)]
            self.corpora = {"": IndexedCorpus(prefixes, tokenizer, " ".join(e for _, e in entries))}
            self.weights = None
        else:
            self.corpora = {entry: IndexedCorpus(resolve_prefixes(entry), tokenizer, entry) for _, entry in entries}
            self.weights = {entry: weight for weight, entry in entries}

    def stream(self, cfg: Mapping, seq_len: int, seed: int, part: int, parts: int, holdout: Holdout = NO_HOLDOUT):
        streams = {name: IndexedWindowStream(corpus, cfg, seq_len, seed, part, parts, holdout)
                   for name, corpus in self.corpora.items()}
        if self.weights is None:
            return streams[""]
        # The blend draws its own numbers: inside a data.mixture source it must not reuse the mixture's draws.
        blend_seed = int(np.random.SeedSequence([seed, 0x626C656E64]).generate_state(1)[0])
        return MixtureStream(streams, self.weights, seed=blend_seed, part=part)


# -- windows -------------------------------------------------------------------------------------

class _EpochTable:
    """The accepted documents of one epoch of a part, in order: where each one's tokens are and where it starts
    in the epoch's token stream (`bounds`, n + 1 entries). `kept`: their indices in the epoch's order (None when
    every document is accepted), which is what a saved position counts."""

    def __init__(self, corpus: IndexedCorpus, order: np.ndarray, min_tokens: int, max_tokens: int | None):
        owner, starts, lengths = corpus.documents(order)
        content = lengths - 1  # EOS excluded, as the on-the-fly filter counts
        accepted = (content > 0) & (content >= min_tokens)
        if max_tokens is not None:
            accepted &= content < max_tokens
        self.kept = None
        if not accepted.all():
            self.kept = np.flatnonzero(accepted)
            owner = None if owner is None else owner[self.kept]
            starts, lengths = starts[self.kept], lengths[self.kept]
        self.owner, self.starts = owner, starts
        self.bounds = np.concatenate([[0], np.cumsum(lengths)])
        self.total = int(self.bounds[-1])


class IndexedWindowStream:
    """`WindowStream`'s windows and position from an `IndexedCorpus`: part `part` of `parts` (data.streams), with
    the data config's shuffle, min_doc_tokens and max_doc_tokens, on `holdout`'s side (eval.data.holdout)."""

    def __init__(self, corpus: IndexedCorpus, cfg: Mapping, seq_len: int, seed: int = 0, part: int = 0,
                 parts: int = 1, holdout: Holdout = NO_HOLDOUT):
        self.corpus = corpus
        self.seq_len = positive_int(seq_len, "seq_len")
        self.seed = positive_int(seed, "data.seed", allow_zero=True)
        self.shuffle = cfg.get("shuffle") is not False
        self.min_doc_tokens, self.max_doc_tokens = doc_token_range(cfg)
        if not 0 <= part < parts:
            raise ValueError(f"data: part {part} does not exist in a corpus split into {parts}")
        self.part, self.parts, self.holdout = part, parts, holdout
        if part >= corpus.num_documents:
            raise ConfigError(f"data.streams={parts}: the corpus has only {corpus.num_documents} documents, "
                              f"fewer than the sub-streams")
        self._tables: dict[int, _EpochTable] = {}
        if self._table(0).total == 0:  # each epoch holds the same documents: none is ever accepted
            raise ConfigError(nothing_accepted_message(self.min_doc_tokens, self.max_doc_tokens, part, parts))
        self._epoch, self._pos = 0, 0  # the next window starts at token _pos of epoch _epoch's stream

    def _table(self, epoch: int) -> _EpochTable:
        if epoch not in self._tables:
            for old in [e for e in self._tables if e < epoch - 1]:
                del self._tables[old]
            order = epoch_order(self.seed, epoch, self.part, self.parts, self.corpus.num_documents, self.shuffle,
                                self.holdout)
            self._tables[epoch] = _EpochTable(self.corpus, order, self.min_doc_tokens, self.max_doc_tokens)
        return self._tables[epoch]

    def next_window(self) -> dict[str, torch.Tensor]:
        """input_ids [S], labels [S] (int64) and cu_seqlens [n+1] (int32) of the next window."""
        S = self.seq_len
        tokens = np.empty(S + 1, dtype=np.int64)  # S inputs plus the label of the last one
        doc_starts, doc_lasts = [], []  # window offsets of each document's first and last token
        filled, epoch, pos = 0, self._epoch, self._pos
        while filled < S + 1:  # a window goes on into the next epoch when this one ends
            table = self._table(epoch)
            take = min(S + 1 - filled, table.total - pos)
            first = int(np.searchsorted(table.bounds, pos, side="right")) - 1
            last = int(np.searchsorted(table.bounds, pos + take, side="left"))
            begins, ends = table.bounds[first:last], table.bounds[first + 1:last + 1]
            piece_begins = np.maximum(begins, pos)
            counts = np.minimum(ends, pos + take) - piece_begins
            sources = table.starts[first:last] + (piece_begins - begins)
            owners = None if table.owner is None else table.owner[first:last]
            self.corpus.gather(tokens[filled:filled + take], owners, sources, counts)
            doc_starts.append(piece_begins - pos + filled)
            doc_lasts.append(ends - 1 - pos + filled)
            filled, pos = filled + take, pos + take
            if pos == table.total:
                epoch, pos = epoch + 1, 0
        labels = tokens[1:].copy()
        lasts = np.concatenate(doc_lasts)
        labels[lasts[lasts < S]] = IGNORE_INDEX  # a document's EOS: the next token starts another document
        starts = np.concatenate(doc_starts)
        self._advance(S)
        return {
            "input_ids": torch.from_numpy(tokens[:S]),
            "labels": torch.from_numpy(labels),
            "cu_seqlens": torch.from_numpy(np.append(starts[starts < S], S).astype(np.int32)),
        }

    def _advance(self, count: int) -> None:
        self._pos += count
        while self._pos >= self._table(self._epoch).total:
            self._pos -= self._table(self._epoch).total
            self._epoch += 1

    def __iter__(self):
        while True:
            yield self.next_window()

    # -- resumption: the position of WindowStream ----------------------------------------------

    def state_dict(self) -> dict:
        table = self._table(self._epoch)
        j = int(np.searchsorted(table.bounds, self._pos, side="right")) - 1
        return {
            "epoch": self._epoch,
            "doc_index": j if table.kept is None else int(table.kept[j]),
            "token_offset": self._pos - int(table.bounds[j]),
            "seed": self.seed,
            "num_documents": self.corpus.num_documents,
            **holdout_state(self.holdout.fraction),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data.seed: the checkpoint's loader used seed {state['seed']}, not {self.seed}")
        if state.get("num_documents") != self.corpus.num_documents:
            raise ValueError(f"data: the checkpoint's loader read a corpus of {state.get('num_documents')} "
                             f"documents, this one has {self.corpus.num_documents}")
        check_holdout(state, self.holdout.fraction)
        epoch, index, offset = int(state["epoch"]), int(state["doc_index"]), int(state["token_offset"])
        table = self._table(epoch)
        # the first accepted document from `index` on: a skipped one holds no token of the stream
        j = index if table.kept is None else int(np.searchsorted(table.kept, index))
        count = len(table.bounds) - 1
        inside = j < count and offset < table.bounds[j + 1] - table.bounds[j]
        if not (inside and (offset == 0 or table.kept is None or table.kept[j] == index)
                or (j == count and offset == 0 and table.kept is not None)):
            raise ValueError("data: the checkpoint's loader position does not fit this corpus or document-length "
                             "filter")
        self._epoch, self._pos = epoch, int(table.bounds[j]) + offset
        self._advance(0)  # past the epoch's end: the next epoch's start

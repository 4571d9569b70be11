"""Read a corpus's documents in a deterministic, resumable order that wraps around forever.

A position is (epoch, index): the index-th document of that epoch's order. `seek` jumps to a
position and `read(count)` returns the next documents with their positions, moving on to the next
epoch when one ends.

- `ShuffledDocuments` (map-style `Dataset`): each epoch is a permutation seeded by (seed, epoch),
  so a position is reached in O(1).
- `StreamedDocuments` (`IterableDataset`): the stream's own order (optionally through datasets'
  seeded shuffle buffer); a position is reached by skipping that many documents.

Both can read one part of a corpus split into `parts` disjoint ones (the sub-streams of
data.streams): part p of a map-style corpus holds the documents i with i % parts == p, shuffled
on their own; each epoch of a stream is split by `datasets.distributed.split_dataset_by_node` (whole
shards when their number divides `parts`, else every parts-th document; with a shuffle buffer, of that
epoch's order, so a part's documents change between epochs). Positions then count within the part.

A `Holdout` (eval.data.holdout) sets documents of a map-style corpus apart for validation by their row: the
training stream skips them and the validation stream reads only them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from data.errors import ConfigError


def _as_text(value, text_field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"data.text_field: column {text_field!r} holds {type(value).__name__}, not text")
    return value


def _unit_hash(rows: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per row: splitmix64 of the row, so a row's fate does not depend on its part."""
    z = rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


HOLDOUT_CHUNK = 1 << 22  # rows hashed at a time


@dataclass(frozen=True)
class Holdout:
    """Row i of a corpus is held out for validation when a hash of i is below `fraction` (eval.data.holdout);
    `held_out` picks those rows (the validation stream) instead of the others (the training stream)."""

    fraction: float = 0.0
    held_out: bool = False

    def part_rows(self, part: int, parts: int, num_documents: int) -> np.ndarray:
        """The rows of part `part` (those i with i % parts == part) that this side of the holdout reads."""
        if self.fraction == 0:
            rows = np.arange(part, num_documents, parts)
        else:  # a chunk of rows at a time: the held-out side of a huge corpus needs memory for its rows only
            chunk, kept = parts * HOLDOUT_CHUNK, []
            for first in range(part, num_documents, chunk):
                rows = np.arange(first, min(first + chunk, num_documents), parts)
                held = _unit_hash(rows) < self.fraction
                kept.append(rows[held if self.held_out else ~held])
            rows = np.concatenate(kept) if kept else np.arange(0)
        where = f" of sub-stream {part} of data.streams={parts}" if parts > 1 else ""
        if len(rows) == 0 and self.held_out:
            raise ConfigError(f"eval.data.holdout={self.fraction} holds out none of the {num_documents} documents"
                              f"{where}; use a larger fraction")
        if len(rows) == 0 and self.fraction > 0:
            raise ConfigError(f"eval.data.holdout={self.fraction} leaves no document for training{where}")
        if len(rows) == 0:
            raise ConfigError(f"data.streams={parts}: the corpus has only {num_documents} documents, "
                              f"fewer than the sub-streams")
        return rows


NO_HOLDOUT = Holdout()


def epoch_order(seed: int, epoch: int, part: int, parts: int, num_documents: int, shuffle: bool = True,
                holdout: Holdout = NO_HOLDOUT):
    """The rows of part `part` (those i with i % parts == part, on `holdout`'s side) of a corpus of
    `num_documents` in the order of `epoch`: the order of map-style text corpora and of indexed ones (data.indexed)
    alike."""
    rows = holdout.part_rows(part, parts, num_documents)
    if not shuffle:
        return rows
    # Sorting raw PCG64 output (a stream numpy keeps stable across versions) rather than
    # Generator.permutation, whose algorithm numpy does not promise to keep. Each part has its
    # own order, so that parts do not read neighbouring documents at the same time.
    raw = np.random.PCG64(np.random.SeedSequence([seed, epoch, part])).random_raw(len(rows))
    return rows[np.argsort(raw, kind="stable")]


def _check_part(part: int, parts: int) -> None:
    if not 0 <= part < parts:
        raise ValueError(f"data: part {part} does not exist in a corpus split into {parts}")


class ShuffledDocuments:
    def __init__(self, dataset, text_field: str, seed: int, shuffle: bool = True, part: int = 0, parts: int = 1,
                 holdout: Holdout = NO_HOLDOUT):
        _check_part(part, parts)
        self.dataset = dataset
        self.text_field = text_field
        self.seed = seed
        self.shuffle = shuffle
        self.part, self.parts, self.holdout = part, parts, holdout
        self.num_documents = len(dataset)  # the whole corpus's, so a checkpoint of another corpus is refused
        self.part_documents = len(holdout.part_rows(part, parts, self.num_documents))
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = epoch_order(self.seed, epoch, self.part, self.parts, self.num_documents, self.shuffle,
                                      self.holdout)
            self._order_epoch = epoch
        return self._order

    def seek(self, epoch: int, index: int) -> None:
        if not 0 <= index < self.part_documents:
            raise ValueError(f"data: document index {index} is outside this corpus part of {self.part_documents}")
        self.epoch, self.index = epoch, index

    def read(self, count: int) -> list[tuple[int, int, str]]:
        found = []
        while len(found) < count:
            order = self._epoch_order(self.epoch)
            stop = min(self.part_documents, self.index + count - len(found))
            rows = [int(i) for i in order[self.index:stop]]
            texts = self.dataset[rows][self.text_field]
            found += [(self.epoch, self.index + k, _as_text(t, self.text_field)) for k, t in enumerate(texts)]
            self.index = stop
            if self.index == self.part_documents:
                self.epoch, self.index = self.epoch + 1, 0
        return found


class StreamedDocuments:
    num_documents = None  # unknown without reading the whole stream

    def __init__(self, dataset, text_field: str, seed: int, shuffle_buffer: int = 0, part: int = 0, parts: int = 1,
                 holdout: Holdout = NO_HOLDOUT):
        from datasets.distributed import split_dataset_by_node

        _check_part(part, parts)
        if holdout.fraction > 0:
            raise ConfigError("eval.data.holdout: a streamed corpus has no row index to hold documents out by; "
                              "give validation its own corpus (eval.data.source/path) or set data.streaming=false")
        self.text_field = text_field
        self.seed = seed
        self.shuffle_buffer = int(shuffle_buffer or 0)
        self.part, self.parts = part, parts
        if self.shuffle_buffer > 0:  # one seed for all parts: they must see the same shard order to split it
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        self.dataset = split_dataset_by_node(dataset, rank=part, world_size=parts) if parts > 1 else dataset
        self.seek(0, 0)

    def _epoch_iterator(self, epoch: int):
        if self.shuffle_buffer > 0:
            self.dataset.set_epoch(epoch)  # datasets reshuffles with seed + epoch
        return iter(self.dataset)

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index
        self._rows = self._epoch_iterator(epoch)
        if index:
            skipped = sum(1 for _ in itertools.islice(self._rows, index))
            if skipped < index:
                raise ValueError(f"data: document index {index} is past the end of this stream ({skipped})")

    def read(self, count: int) -> list[tuple[int, int, str]]:
        found = []
        while len(found) < count:
            row = next(self._rows, None)
            if row is None:
                if self.index == 0:
                    raise ConfigError(self._empty_message())
                self.seek(self.epoch + 1, 0)
                continue
            if self.text_field not in row:
                raise ConfigError(f"data.text_field: no column {self.text_field!r} "
                                  f"(columns: {', '.join(row)})")
            found.append((self.epoch, self.index, _as_text(row[self.text_field], self.text_field)))
            self.index += 1
        return found

    def _empty_message(self) -> str:
        if self.parts > 1:
            return (f"data.streams={self.parts}: sub-stream {self.part} of the streamed dataset holds no "
                    f"documents (the stream has fewer documents than sub-streams)")
        return "data.path: the streamed dataset holds no documents"

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
"""

from __future__ import annotations

import itertools

import numpy as np

from data.errors import ConfigError


def _as_text(value, text_field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"data.text_field: column {text_field!r} holds {type(value).__name__}, not text")
    return value


def epoch_order(seed: int, epoch: int, part: int, parts: int, num_documents: int, shuffle: bool = True):
    """The rows of part `part` (those i with i % parts == part) of a corpus of `num_documents` in the order of
    `epoch`: the order of map-style text corpora and of indexed ones (data.indexed) alike."""
    part_documents = len(range(part, num_documents, parts))
    order = np.arange(part_documents)
    if shuffle:
        # Sorting raw PCG64 output (a stream numpy keeps stable across versions) rather than
        # Generator.permutation, whose algorithm numpy does not promise to keep. Each part has its
        # own order, so that parts do not read neighbouring documents at the same time.
        raw = np.random.PCG64(np.random.SeedSequence([seed, epoch, part])).random_raw(part_documents)
        order = np.argsort(raw, kind="stable")
    return part + parts * order


def _check_part(part: int, parts: int) -> None:
    if not 0 <= part < parts:
        raise ValueError(f"data: part {part} does not exist in a corpus split into {parts}")


class ShuffledDocuments:
    def __init__(self, dataset, text_field: str, seed: int, shuffle: bool = True, part: int = 0, parts: int = 1):
        _check_part(part, parts)
        self.dataset = dataset
        self.text_field = text_field
        self.seed = seed
        self.shuffle = shuffle
        self.part, self.parts = part, parts
        self.num_documents = len(dataset)  # the whole corpus's, so a checkpoint of another corpus is refused
        self.part_documents = len(range(part, self.num_documents, parts))
        if self.part_documents == 0:
            raise ConfigError(f"data.streams={parts}: the corpus has only {self.num_documents} documents, "
                              f"fewer than the sub-streams")
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = epoch_order(self.seed, epoch, self.part, self.parts, self.num_documents, self.shuffle)
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

    def __init__(self, dataset, text_field: str, seed: int, shuffle_buffer: int = 0, part: int = 0, parts: int = 1):
        from datasets.distributed import split_dataset_by_node

        _check_part(part, parts)
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

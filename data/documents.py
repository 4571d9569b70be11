"""Read a corpus's documents in a deterministic, resumable order that wraps around forever.

A position is (epoch, index): the index-th document of that epoch's order. `seek` jumps to a
position and `read(count)` returns the next documents with their positions, moving on to the next
epoch when one ends.

- `ShuffledDocuments` (map-style `Dataset`): each epoch is a permutation seeded by (seed, epoch),
  so a position is reached in O(1).
- `StreamedDocuments` (`IterableDataset`): the stream's own order (optionally through datasets'
  seeded shuffle buffer); a position is reached by skipping that many documents.
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


class ShuffledDocuments:
    def __init__(self, dataset, text_field: str, seed: int, shuffle: bool = True):
        self.dataset = dataset
        self.text_field = text_field
        self.seed = seed
        self.shuffle = shuffle
        self.num_documents = len(dataset)
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                # Sorting raw PCG64 output (a stream numpy keeps stable across versions) rather than
                # Generator.permutation, whose algorithm numpy does not promise to keep.
                keys = np.random.PCG64(np.random.SeedSequence([self.seed, epoch])).random_raw(self.num_documents)
                self._order = np.argsort(keys, kind="stable")
            else:
                self._order = np.arange(self.num_documents)
            self._order_epoch = epoch
        return self._order

    def seek(self, epoch: int, index: int) -> None:
        if not 0 <= index < self.num_documents:
            raise ValueError(f"data: document index {index} is outside this corpus of {self.num_documents}")
        self.epoch, self.index = epoch, index

    def read(self, count: int) -> list[tuple[int, int, str]]:
        found = []
        while len(found) < count:
            order = self._epoch_order(self.epoch)
            stop = min(self.num_documents, self.index + count - len(found))
            rows = [int(i) for i in order[self.index:stop]]
            texts = self.dataset[rows][self.text_field]
            found += [(self.epoch, self.index + k, _as_text(t, self.text_field)) for k, t in enumerate(texts)]
            self.index = stop
            if self.index == self.num_documents:
                self.epoch, self.index = self.epoch + 1, 0
        return found


class StreamedDocuments:
    num_documents = None  # unknown without reading the whole stream

    def __init__(self, dataset, text_field: str, seed: int, shuffle_buffer: int = 0):
        self.dataset = dataset
        self.text_field = text_field
        self.seed = seed
        self.shuffle_buffer = int(shuffle_buffer or 0)
        self.seek(0, 0)

    def _epoch_iterator(self, epoch: int):
        dataset = self.dataset
        if self.shuffle_buffer > 0:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            dataset.set_epoch(epoch)  # datasets reshuffles with seed + epoch
        return iter(dataset)

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
                    raise ConfigError("data.path: the streamed dataset holds no documents")
                self.seek(self.epoch + 1, 0)
                continue
            if self.text_field not in row:
                raise ConfigError(f"data.text_field: no column {self.text_field!r} "
                                  f"(columns: {', '.join(row)})")
            found.append((self.epoch, self.index, _as_text(row[self.text_field], self.text_field)))
            self.index += 1
        return found

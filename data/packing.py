"""Pack tokenized documents into fixed windows of `seq_len` tokens with document boundaries.

The token stream is the documents in `data.documents` order, each followed by EOS. Window k holds
stream tokens [k*S, (k+1)*S): no padding, and a document cut by a window edge goes on in the next
window as a fresh segment (attention and the lightning state reset there, as at a document start).
Labels are the next stream token (one token of look-ahead at the window's end), except -100 at a
document's EOS, whose next token belongs to another document.

Documents are tokenized lazily, a batch at a time, so a big corpus is never tokenized up front. The
loader position is (epoch, document index, token offset) of the next window's first token, so
`load_state_dict` rebuilds exactly the next windows, whatever `seq_len` is then. A stream can pack one
part of a corpus split into `parts` (`data.documents`): the sub-streams of `data.substreams`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from data.corpus import load_corpus
from data.documents import NO_HOLDOUT, Holdout, ShuffledDocuments, StreamedDocuments
from data.errors import ConfigError, positive_int

IGNORE_INDEX = -100


def doc_token_range(cfg: Mapping) -> tuple[int, int | None]:
    """(data.min_doc_tokens, data.max_doc_tokens): documents with a token count (EOS excluded) outside
    [min, max) are skipped."""
    min_doc_tokens = positive_int(cfg.get("min_doc_tokens") or 0, "data.min_doc_tokens", True)
    max_doc_tokens = cfg.get("max_doc_tokens")
    if max_doc_tokens is not None:
        max_doc_tokens = positive_int(max_doc_tokens, "data.max_doc_tokens")
    return min_doc_tokens, max_doc_tokens


def nothing_accepted_message(min_doc_tokens: int, max_doc_tokens: int | None, part: int, parts: int) -> str:
    where = f" in sub-stream {part} of data.streams={parts}" if parts > 1 else ""
    if min_doc_tokens or max_doc_tokens is not None:
        return (f"data.min_doc_tokens/max_doc_tokens: no document{where} has a token count in "
                f"[{min_doc_tokens}, {max_doc_tokens})")
    return f"data.path: every document{where} is empty after tokenization"


def holdout_state(fraction: float) -> dict:
    """The holdout a position counts documents without (only when there is one: older positions lack it)."""
    return {"holdout": fraction} if fraction > 0 else {}


def check_holdout(state: Mapping, fraction: float) -> None:
    saved = state.get("holdout", 0.0)
    if saved != fraction:
        raise ValueError(f"eval.data.holdout: the checkpoint's run held out {saved} of the documents, this one "
                         f"{fraction}; resume with eval.data.holdout={saved}")


@dataclass
class _TokenizedDocument:
    epoch: int
    index: int
    tokens: np.ndarray  # int32, EOS last


class WindowStream:
    """An endless, deterministic, resumable stream of packed windows.

    source: the `data` config (a mapping with source, path, name, split, streaming, text_field, and
    optional shuffle, shuffle_buffer, sample_by, min_doc_tokens, max_doc_tokens), or an already
    opened `datasets.Dataset` / `IterableDataset` with a "text" column.
    corpus: the config's corpus already opened (`load_corpus(source)`), so that many parts share it.
    Documents whose token count (EOS excluded) is outside [min_doc_tokens, max_doc_tokens) are
    skipped, which is how the short/medium/long buckets of a long-context mixture are made.
    holdout: the documents held out for validation (`data.documents.Holdout`) and which side this stream reads.
    """

    def __init__(self, source, tokenizer, seq_len: int, seed: int = 0, *, corpus=None, part: int = 0,
                 parts: int = 1, tokenize_batch: int = 256, holdout: Holdout = NO_HOLDOUT):
        from datasets import Dataset, IterableDataset

        self.seq_len = positive_int(seq_len, "seq_len")
        self.seed = positive_int(seed, "data.seed", allow_zero=True)
        self.tokenizer = tokenizer
        self.tokenize_batch = positive_int(tokenize_batch, "tokenize_batch")
        opened = isinstance(source, (Dataset, IterableDataset))
        cfg = {} if opened else source
        text_field = cfg.get("text_field", "text") or "text"
        self.min_doc_tokens, self.max_doc_tokens = doc_token_range(cfg)
        if opened:
            dataset = source
        else:
            dataset = corpus if corpus is not None else load_corpus(cfg)
        if isinstance(dataset, IterableDataset):
            self._documents = StreamedDocuments(dataset, text_field, self.seed, cfg.get("shuffle_buffer", 0),
                                                part, parts, holdout)
        else:
            self._documents = ShuffledDocuments(dataset, text_field, self.seed, cfg.get("shuffle") is not False,
                                                part, parts, holdout)
        self.holdout = holdout.fraction
        self._reset_buffer(epoch=0)
        self._docs_seen, self._tokens_seen = 0, 0  # for the read-ahead size only

    # -- filling the buffer ------------------------------------------------------------------

    def _reset_buffer(self, epoch: int) -> None:
        self._buffer: deque[_TokenizedDocument] = deque()
        self._offset = 0  # tokens of _buffer[0] already emitted
        self._buffered = 0  # tokens in the buffer not yet emitted
        self._last_accepted_epoch = epoch

    def _accepts(self, num_tokens: int) -> bool:
        if num_tokens == 0 or num_tokens < self.min_doc_tokens:
            return False
        return self.max_doc_tokens is None or num_tokens < self.max_doc_tokens

    def _read_count(self, missing: int) -> int:
        # Read about as many documents as the missing tokens need (at least a small batch, since
        # each read has a fixed cost), so book-length documents do not pile up in memory while
        # short ones are tokenized in large, fast batches.
        smallest = min(self.tokenize_batch, 16)
        if self._docs_seen == 0:
            return smallest
        mean_tokens = max(1.0, self._tokens_seen / self._docs_seen)
        return max(smallest, min(self.tokenize_batch, math.ceil(missing / mean_tokens) + 1))

    def _fill(self, need: int) -> None:
        eos = self.tokenizer.eos_id
        while self._buffered < need:
            batch = self._documents.read(self._read_count(need - self._buffered))
            encoded = self.tokenizer.encode_batch([text for _, _, text in batch])
            for (epoch, index, _), ids in zip(batch, encoded):
                self._docs_seen += 1
                self._tokens_seen += len(ids) + 1
                if not self._accepts(len(ids)):
                    if epoch >= self._last_accepted_epoch + 2:  # a whole epoch without one document
                        raise ConfigError(self._nothing_accepted_message())
                    continue
                tokens = np.empty(len(ids) + 1, dtype=np.int32)
                tokens[:-1] = ids
                tokens[-1] = eos
                self._buffer.append(_TokenizedDocument(epoch, index, tokens))
                self._buffered += len(tokens)
                self._last_accepted_epoch = epoch

    def _nothing_accepted_message(self) -> str:
        return nothing_accepted_message(self.min_doc_tokens, self.max_doc_tokens, self._documents.part,
                                        self._documents.parts)

    # -- windows -----------------------------------------------------------------------------

    def next_window(self) -> dict[str, torch.Tensor]:
        """input_ids [S], labels [S] (int64) and cu_seqlens [n+1] (int32) of the next window."""
        S = self.seq_len
        self._fill(S + 1)  # S inputs plus the label of the last one
        pieces, starts, ends_at_eos = [], [], []
        taken, offset = 0, self._offset
        for doc in self._buffer:
            take = min(len(doc.tokens) - offset, S + 1 - taken)
            pieces.append(doc.tokens[offset:offset + take])
            starts.append(taken)
            ends_at_eos.append(offset + take == len(doc.tokens))
            taken += take
            offset = 0
            if taken == S + 1:
                break
        tokens = np.concatenate(pieces).astype(np.int64)
        labels = tokens[1:].copy()
        for start, piece, at_eos in zip(starts, pieces, ends_at_eos):
            last = start + len(piece) - 1
            if at_eos and last < S:
                labels[last] = IGNORE_INDEX  # the next token starts another document
        cu_seqlens = [s for s in starts if s < S] + [S]
        self._advance(S)
        return {
            "input_ids": torch.from_numpy(tokens[:S].copy()),
            "labels": torch.from_numpy(labels),
            "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
        }

    def _advance(self, count: int) -> None:
        self._buffered -= count
        while count:
            available = len(self._buffer[0].tokens) - self._offset
            if available <= count:
                self._buffer.popleft()
                self._offset = 0
                count -= available
            else:
                self._offset += count
                count = 0

    def __iter__(self):
        while True:
            yield self.next_window()

    # -- resumption --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self._buffer:
            epoch, index = self._buffer[0].epoch, self._buffer[0].index
        else:
            epoch, index = self._documents.epoch, self._documents.index
        return {
            "epoch": epoch,
            "doc_index": index,
            "token_offset": self._offset,
            "seed": self.seed,
            "num_documents": self._documents.num_documents,
            **holdout_state(self.holdout),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data.seed: the checkpoint's loader used seed {state['seed']}, not {self.seed}")
        if state.get("num_documents") != self._documents.num_documents:
            raise ValueError(f"data: the checkpoint's loader read a corpus of {state.get('num_documents')} "
                             f"documents, this one has {self._documents.num_documents}")
        check_holdout(state, self.holdout)
        epoch, index, offset = int(state["epoch"]), int(state["doc_index"]), int(state["token_offset"])
        self._documents.seek(epoch, index)
        self._reset_buffer(epoch)
        self._fill(offset + 1)
        first = self._buffer[0]
        # at a document start the saved position may be a skipped document's (nothing was read after it yet):
        # the stream goes on at the first accepted one from there
        at = (first.epoch, first.index)
        if (at != (epoch, index) and (offset or at < (epoch, index))) or offset >= len(first.tokens):
            raise ValueError("data: the checkpoint's loader position does not fit this corpus, tokenizer "
                             "or document-length filter")
        self._offset = offset
        self._buffered -= offset

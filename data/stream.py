"""`DataSource`: the `data` config checked and its corpora opened once; it builds the sub-streams.

The corpus is split into `data.streams` disjoint sub-streams (`data.documents`), each packed into windows
on its own; `data.substreams` says which of them a data-parallel rank reads. `build_stream` is the whole
corpus as one stream.
"""

from __future__ import annotations

from collections.abc import Mapping

from data.corpus import SOURCES, load_corpus
from data.documents import NO_HOLDOUT, Holdout
from data.errors import ConfigError, positive_int
from data.indexed import IndexedSource
from data.mixture import MixtureStream, normalized_weights
from data.packing import WindowStream


class DataSource:
    """Sub-stream `part` of `num_streams` (a `WindowStream`, an `IndexedWindowStream` for `data.source: indexed`,
    or a `MixtureStream` when `data.mixture` names sources or data.path weighs indexed corpora) from `stream(part)`.

    `data.mixture` maps a source name to the settings it overrides on top of `data` plus its `weight`, e.g.
    `short: {max_doc_tokens: 32768, weight: 0.3}`. Every setting is checked here, so that a bad one fails
    before any work; `data.streams` (default 1: the whole corpus in one stream) is the number of sub-streams.
    `holdout` (`data.documents.Holdout`): the documents set apart for validation, and which side is read.
    """

    def __init__(self, data_cfg: Mapping, tokenizer, seq_len: int, holdout: Holdout = NO_HOLDOUT):
        self.tokenizer, self.seq_len, self.holdout = tokenizer, seq_len, holdout
        self.seed = data_cfg.get("seed", 0) or 0
        self.num_streams = positive_int(data_cfg.get("streams", 1), "data.streams")
        base = {k: v for k, v in data_cfg.items() if k not in ("mixture", "streams")}
        mixture = data_cfg.get("mixture")
        self.configs, self.weights = {"": base}, None
        if mixture:
            self.configs, self.weights = {}, {}
            for name, overrides in mixture.items():
                if not isinstance(overrides, Mapping) or "weight" not in overrides:
                    raise ConfigError(f"data.mixture.{name}: expected a mapping with a weight, got {overrides!r}")
                self.configs[name] = {**base, **{k: v for k, v in overrides.items() if k != "weight"}}
                self.weights[name] = overrides["weight"]
            normalized_weights(self.weights, list(self.configs))
        indexed: dict[str, IndexedSource] = {}  # opened once per data.path, whatever the mixture sources
        self.corpora = {name: self._open(cfg, indexed) for name, cfg in self.configs.items()}
        self.stream(self.num_streams - 1)  # the smallest part: checks the remaining settings (nothing is read)

    def _open(self, cfg: Mapping, indexed: dict):
        source = cfg.get("source", "default") or "default"
        if source != "indexed":
            if source not in SOURCES:
                raise ConfigError(f"data.source: must be one of {', '.join(SOURCES)}, indexed, got {source!r}")
            return load_corpus(cfg)
        key = repr(cfg.get("path"))
        if key not in indexed:
            indexed[key] = IndexedSource(cfg.get("path"), self.tokenizer)
        return indexed[key]

    def _window_stream(self, name: str, part: int):
        corpus = self.corpora[name]
        if isinstance(corpus, IndexedSource):
            return corpus.stream(self.configs[name], self.seq_len, self.seed, part, self.num_streams, self.holdout)
        return WindowStream(self.configs[name], self.tokenizer, self.seq_len, seed=self.seed,
                            corpus=corpus, part=part, parts=self.num_streams, holdout=self.holdout)

    def stream(self, part: int):
        if self.weights is None:
            return self._window_stream("", part)
        return MixtureStream({name: self._window_stream(name, part) for name in self.configs}, self.weights,
                             seed=self.seed, part=part)


def build_stream(data_cfg: Mapping, tokenizer, seq_len: int):
    """The whole corpus as one stream (`data.streams` ignored): a `WindowStream` or a `MixtureStream`."""
    return DataSource({k: v for k, v in data_cfg.items() if k != "streams"}, tokenizer, seq_len).stream(0)

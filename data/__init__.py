"""Data: corpora (HF `datasets`), tokenizers, packing into windows, mixtures, resumable state.

    from data import build_tokenizer, build_stream, collate_windows
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    stream = build_stream(cfg.data, tokenizer, seq_len)  # the whole corpus as one stream
    batch = collate_windows([stream.next_window() for _ in range(global_windows)])

A data-parallel trainer splits the corpus into data.streams sub-streams; each DP rank reads only its own,
ahead of the steps in a background thread:

    streams = RankStreams(DataSource(cfg.data, tokenizer, seq_len), dp, dp_rank, dp_group)
    prefetcher = StepPrefetcher(streams)
    prefetcher.start(global_windows_of_each_step)
    windows = prefetcher.next_step()  # this rank's windows of the step
"""

from data.collate import collate_windows
from data.corpus import load_corpus
from data.documents import Holdout
from data.errors import ConfigError
from data.mixture import MixtureStream, MixtureTransition, interpolate_weights
from data.packing import IGNORE_INDEX, WindowStream
from data.prefetch import StepPrefetcher
from data.stream import DataSource, build_stream
from data.substreams import RankStreams, check_streams
from data.tokenizer import TextTokenizer, build_tokenizer

__all__ = [
    "IGNORE_INDEX", "ConfigError", "DataSource", "Holdout", "MixtureStream", "MixtureTransition", "RankStreams",
    "StepPrefetcher", "TextTokenizer", "WindowStream", "build_stream", "build_tokenizer", "check_streams",
    "collate_windows", "interpolate_weights", "load_corpus",
]

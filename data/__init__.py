"""Data: corpora (HF `datasets`), tokenizers, packing into windows, mixtures, resumable state.

    from data import build_tokenizer, WindowStream, collate_windows
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    stream = WindowStream(cfg.data, tokenizer, seq_len, seed=cfg.data.seed)
    batch = collate_windows([stream.next_window() for _ in range(global_windows)])
"""

from data.collate import collate_windows
from data.corpus import load_corpus
from data.errors import ConfigError
from data.mixture import MixtureStream, interpolate_weights
from data.packing import IGNORE_INDEX, WindowStream
from data.stream import build_stream
from data.tokenizer import TextTokenizer, build_tokenizer

__all__ = [
    "IGNORE_INDEX", "ConfigError", "MixtureStream", "TextTokenizer", "WindowStream", "build_stream",
    "build_tokenizer", "collate_windows", "interpolate_weights", "load_corpus",
]

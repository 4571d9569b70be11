"""Tokenizers: the shipped default, a local tokenizer.json or HF folder, or an HF hub name.

`build_tokenizer(spec)` returns a `TextTokenizer` with the few things the data pipeline needs:
`vocab_size`, `eos_id`, `encode`, `encode_batch` and `decode`. No special tokens (BOS, ...) are
added when encoding; the packer appends EOS after every document itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from data.errors import ConfigError

DEFAULT_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer.json"
# Tried in order when a bare tokenizer.json does not say which token ends a document.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")


class TextTokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` or a `transformers` tokenizer."""

    def __init__(self, backend, eos_id: int, vocab_size: int, name: str):
        from tokenizers import Tokenizer

        self._backend = backend
        self._is_hf_fast = isinstance(backend, Tokenizer)  # else a transformers tokenizer
        self.eos_id = int(eos_id)
        self.vocab_size = int(vocab_size)
        self.name = name

    def encode(self, text: str) -> list[int]:
        if self._is_hf_fast:
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._is_hf_fast:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return self._backend(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._backend.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _eos_from_tokenizer_config(folder: Path) -> str | None:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _from_tokenizer_json(path: Path, spec: str, eos_token: str | None = None) -> TextTokenizer:
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 -- tokenizers raises a bare Exception on malformed files
        raise ConfigError(f"data.tokenizer: cannot load '{spec}': {_first_line(error)}") from None
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    eos_id = next((backend.token_to_id(t) for t in candidates if backend.token_to_id(t) is not None), None)
    if eos_id is None:
        raise ConfigError(f"data.tokenizer: '{spec}' has no end-of-text token (tried {', '.join(candidates)})")
    return TextTokenizer(backend, eos_id, backend.get_vocab_size(with_added_tokens=True), spec)


def _from_transformers(spec: str) -> TextTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"data.tokenizer: loading '{spec}' needs transformers (pip install '.[hf]')") from None
    try:
        backend = AutoTokenizer.from_pretrained(spec)
    except Exception as error:  # noqa: BLE001 -- OSError, ValueError, hub errors: all mean "cannot load"
        raise ConfigError(f"data.tokenizer: cannot load '{spec}': {_first_line(error)}") from None
    if backend.eos_token_id is None:
        raise ConfigError(f"data.tokenizer: '{spec}' defines no eos_token")
    return TextTokenizer(backend, backend.eos_token_id, len(backend), spec)


def build_tokenizer(spec: str = "default") -> TextTokenizer:
    """"default" | path to a tokenizer.json | HF tokenizer folder | HF hub name (offline if cached)."""
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ConfigError(f"data.tokenizer: expected 'default', a path or a hub name, got {spec!r}")
    spec = str(spec)
    if spec == "default":
        return _from_tokenizer_json(DEFAULT_TOKENIZER, spec, "<|endoftext|>")
    path = Path(spec).expanduser()
    if path.is_file():
        return _from_tokenizer_json(path, spec)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_tokenizer_json(path / "tokenizer.json", spec, _eos_from_tokenizer_config(path))
        return _from_transformers(spec)
    # Something that looks like a path (not an "org/name" hub id) but is not there.
    if spec.startswith((".", "/", "~")) or spec.endswith(".json") or spec.count("/") > 1:
        raise ConfigError(f"data.tokenizer: {spec} does not exist")
    return _from_transformers(spec)

"""`build_stream`: the trainer's one call from the `data` config to a stream of windows."""

from __future__ import annotations

from collections.abc import Mapping

from data.errors import ConfigError
from data.mixture import MixtureStream
from data.packing import WindowStream


def build_stream(data_cfg: Mapping, tokenizer, seq_len: int):
    """A `WindowStream`, or a `MixtureStream` when `data.mixture` names sources.

    `data.mixture` maps a source name to the settings it overrides on top of `data` plus its
    `weight`, e.g. `short: {max_doc_tokens: 32768, weight: 0.3}`.
    """
    seed = data_cfg.get("seed", 0) or 0
    mixture = data_cfg.get("mixture")
    if not mixture:
        return WindowStream(data_cfg, tokenizer, seq_len, seed=seed)
    base = {k: v for k, v in data_cfg.items() if k != "mixture"}
    streams, weights = {}, {}
    for name, overrides in mixture.items():
        if not isinstance(overrides, Mapping) or "weight" not in overrides:
            raise ConfigError(f"data.mixture.{name}: expected a mapping with a weight, got {overrides!r}")
        source_cfg = {**base, **{k: v for k, v in overrides.items() if k != "weight"}}
        streams[name] = WindowStream(source_cfg, tokenizer, seq_len, seed=seed)
        weights[name] = overrides["weight"]
    return MixtureStream(streams, weights, seed=seed)

"""The error raised for bad data settings: one line that names the setting and what is wrong."""

import numpy as np


class ConfigError(ValueError):
    """Bad input anywhere (trainer, layout, data): one line naming the setting, e.g. ``data.path: /x does not
    exist``; the entry points print it and exit with code 2."""


def positive_int(value, setting: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if allow_zero else 1):
        raise ConfigError(f"{setting}: must be a {'non-negative' if allow_zero else 'positive'} integer, "
                          f"got {value!r}")
    return int(value)

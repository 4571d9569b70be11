"""The error raised for bad data settings: one line that names the setting and what is wrong."""


class ConfigError(ValueError):
    """A data setting is wrong, e.g. ``data.path: /x does not exist``."""

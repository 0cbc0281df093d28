"""Errors raised for bad user settings.

A :class:`ConfigError` message is always one line that names the flag and its valid range, so the
benchmark scripts can print it as-is instead of a traceback.
"""


class ConfigError(ValueError):
    """A setting is outside its valid range (the message names the flag and the range)."""

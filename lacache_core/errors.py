"""Errors raised for bad user settings.

A :class:`ConfigError` message is always one line that names the setting and its valid range, so the
benchmark scripts can print it as-is instead of a traceback. The library names a setting as its owner and
field, ``Class.field`` (``KIVI.bits must be 2, 4 or 8, got 3``, ``LaCache.overlap must be in [0, 3], got 4``),
or, for an argument of a function, ``function.argument`` (``make_cache.method``, ``make_cache.key_rotation``,
``prefill.chunk_size``). The harness says each such name as its command-line flag where it prints the error
(``harness.flags.as_flags``: ``--quant_bits``, ``--overlap``, ``--method``), so the library never names a flag.
"""


class ConfigError(ValueError):
    """A setting is outside its valid range (the message names the setting, ``Class.field``, and the range)."""

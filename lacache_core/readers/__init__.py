"""Sparse readers, one module each, and the registry that maps ``--read`` names to them.

A reader is a frozen dataclass of :func:`lacache_core.params.param` fields subclassing
:class:`~lacache_core.readers.base.Reader`. Registered here, it gets its flags (``--<name>_<field>``), checks
and folder names from the harness.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

from ..errors import ConfigError
from .base import Reader
from .quest import Quest

READERS: Dict[str, Type[Reader]] = {cls.name: cls for cls in (Quest,)}


def build_reader(name: str, **settings) -> Optional[Reader]:
    """The reader registered as ``name`` with ``settings`` (its defaults for the others); ``None`` for ``"none"``."""
    if name != "none" and name not in READERS:
        raise ConfigError(f"make_cache.read must be one of {['none', *READERS]}, got {name!r}")
    return None if name == "none" else READERS[name](**settings)


__all__ = ["Quest", "READERS", "Reader", "build_reader"]

"""Quantizers, one module each, and the registry that maps ``--quant`` names to them.

A quantizer is a frozen dataclass of :func:`lacache_core.params.param` fields subclassing
:class:`~lacache_core.quantizers.base.Quantizer`; its layer store lives in a module the dataclass imports
(:mod:`lacache_core.quant`, :mod:`lacache_core.gear`, :mod:`lacache_core.kivi_reference`), which never imports
it back. Registered here, it gets its ``--quant_*`` flags, checks and folder names from the harness.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

from ..errors import ConfigError
from .base import Quantizer
from .gear import GEAR
from .kivi import KIVI

QUANTIZERS: Dict[str, Type[Quantizer]] = {cls.name: cls for cls in (KIVI, GEAR)}


def build_quantizer(name: str, **settings) -> Optional[Quantizer]:
    """The quantizer registered as ``name`` with ``settings`` (its defaults for the others); ``None`` for ``"none"``."""
    if name != "none" and name not in QUANTIZERS:
        raise ConfigError(f"make_cache.quant must be one of {['none', *QUANTIZERS]}, got {name!r}")
    return None if name == "none" else QUANTIZERS[name](**settings)


__all__ = ["GEAR", "KIVI", "QUANTIZERS", "Quantizer", "build_quantizer"]

"""Cache policies, one per module, and the registry that maps method names to them."""
from __future__ import annotations

from dataclasses import fields
from typing import Dict, Tuple, Type

from ..errors import ConfigError
from .adakv import AdaKV
from .base import CachePolicy
from .cam import CAM
from .chunkkv import ChunkKV
from .criticalkv import CriticalKV
from .duo_attention import DuoAttention
from .expected_attention import ExpectedAttention
from .full import FullCache
from .h2o import H2O
from .headkv import HeadKV
from .keydiff import KeyDiff
from .knorm import KNorm, KNormDecode
from .kvzip import KVzip
from .lacache import LaCache
from .lagkv import LagKV
from .lshe import LSHE
from .minicache import MiniCache
from .nacl import NACL
from .pyramidinfer import PyramidInfer
from .pyramidkv import PyramidKV
from .rkv import RKV
from .scissorhands import Scissorhands
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .think import ThinK
from .tova import TOVA

METHODS: Dict[str, Type[CachePolicy]] = {
    cls.name: cls for cls in (
        FullCache, StreamingLLM, LaCache,                        # position-only
        H2O, TOVA, LSHE, KNormDecode, Scissorhands, CAM,         # decode-time scoring (CAM merges values)
        SnapKV, PyramidKV, PyramidInfer, KNorm, NACL, AdaKV, HeadKV, ThinK,  # prefill-time
        MiniCache,                                               # prefill-time, merges layer pairs
        KeyDiff, LagKV, ExpectedAttention, ChunkKV, CriticalKV,  # prefill-time scorers (kvpress's ScorerPress family)
        DuoAttention,                                            # prefill-time, streaming and retrieval heads
        KVzip,                                                   # prefill-time, scored by reconstruction passes
        RKV,                                                     # decode-time, importance minus redundancy
    )
}


def budget_derived(cls: Type[CachePolicy]) -> Tuple[str, ...]:
    """Fields that :func:`build_policy` derives from ``cache_size`` when they are not given: the window of a
    method parameterised by its window rather than its size (StreamingLLM's ``recent_size``)."""
    names = {f.name for f in fields(cls) if f.init}
    return ("recent_size",) if "cache_size" not in names and "recent_size" in names else ()


def build_policy(method: str, **settings) -> CachePolicy:
    """Instantiate the policy registered as ``method``; settings it does not take are ignored.

    This lets every harness pass one flat set of flags (``cache_size``, ``span``, ...) to any method.
    """
    if method not in METHODS:
        raise ConfigError(f"make_cache.method must be one of {sorted(METHODS)}, got {method!r}")
    cls = METHODS[method]
    names = {f.name for f in fields(cls) if f.init}
    if budget_derived(cls) and settings.get("recent_size") is None and settings.get("cache_size") is not None:
        # StreamingLLM is parameterised by its window: a cache_size budget means the same slots as for
        # every other method, sinks included
        start = settings.get("start_size")
        start = cls.start_size if start is None else start
        if settings["cache_size"] <= start:
            raise ConfigError(f"build_policy.cache_size {settings['cache_size']} must exceed {cls.__name__}.start_size "
                              f"{start} for {method}")
        settings = {**settings, "recent_size": settings["cache_size"] - start}
    return cls(**{k: v for k, v in settings.items() if k in names and v is not None})


def policy_from_state(saved: dict) -> CachePolicy:
    """The policy :meth:`CachePolicy.state_dict` saved: built from its settings, its running state restored."""
    if saved.get("method") not in METHODS:
        raise ConfigError(f"saved policy {saved.get('method')!r} is not a registered method ({sorted(METHODS)})")
    policy = METHODS[saved["method"]](**saved["settings"])
    policy.load_state_dict(saved)
    return policy


__all__ = ["CachePolicy", "FullCache", "LaCache", "StreamingLLM", "H2O", "TOVA", "LSHE", "KNormDecode", "Scissorhands", "CAM",
           "SnapKV", "PyramidKV", "PyramidInfer", "KNorm", "NACL", "AdaKV", "HeadKV", "ThinK", "MiniCache", "KeyDiff", "LagKV", "ExpectedAttention", "ChunkKV", "CriticalKV", "DuoAttention", "KVzip", "RKV", "METHODS", "budget_derived", "build_policy",
           "policy_from_state"]

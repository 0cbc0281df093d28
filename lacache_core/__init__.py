"""lacache_core: LaCache and baseline KV-cache policies with position-shifted attention for HF models."""
from .errors import ConfigError
from .policies import (CAM, H2O, ChunkKV, ExpectedAttention, KeyDiff, LagKV, RKV, CriticalKV, DuoAttention, KVzip, AdaKV, HeadKV, LSHE, METHODS, NACL, TOVA, CachePolicy, FullCache, KNorm, KNormDecode, LaCache,
                       PyramidInfer, PyramidKV, Scissorhands, SnapKV, StreamingLLM, ThinK, build_policy)
from .patches import enable_position_shift, is_position_shifted
from .build import make_cache, make_row_cache, prefill, prompt_passes
from .cache import CompressedCache
from .quantizers import GEAR, KIVI, QUANTIZERS
from .readers import READERS, Quest

__all__ = [
    "ConfigError", "METHODS", "CachePolicy", "CAM", "FullCache", "LaCache", "StreamingLLM", "H2O", "TOVA", "LSHE", "SnapKV",
    "PyramidKV", "PyramidInfer", "KNorm", "KNormDecode", "Scissorhands", "NACL", "AdaKV", "HeadKV", "ThinK",
    "KeyDiff", "LagKV", "ExpectedAttention", "ChunkKV", "CriticalKV", "DuoAttention", "KVzip", "RKV",
    "build_policy",
    "enable_position_shift", "is_position_shifted", "CompressedCache", "make_cache", "make_row_cache", "prefill", "prompt_passes", "KIVI", "GEAR", "Quest",
    "QUANTIZERS", "READERS",
]
__version__ = "0.1.0"

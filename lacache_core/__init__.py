"""lacache_core: LaCache and baseline KV-cache policies with position-shifted attention for HF models."""
from .errors import ConfigError
from .policies import METHODS, CachePolicy, FullCache, LaCache, StreamingLLM, build_policy

__all__ = ["ConfigError", "METHODS", "CachePolicy", "FullCache", "LaCache", "StreamingLLM", "build_policy"]
__version__ = "0.1.0"

"""Which transformers generation is installed, and the shims that absorb its API changes."""
from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS = Version(transformers.__version__)
#: Cache objects (``DynamicCache``) exist; older versions pass tuples of tensors.
HAS_CACHE_CLASSES = TRANSFORMERS >= Version("4.36")
#: Attention modules take ``position_embeddings`` and call ``ALL_ATTENTION_FUNCTIONS`` (4.48+).
MODERN_ATTENTION = TRANSFORMERS >= Version("4.48")
#: Models and generate() name the cache argument ``cache`` from 5.24 on (``past_key_values`` is deprecated).
CACHE_KWARG = "cache" if TRANSFORMERS >= Version("5.24") else "past_key_values"
#: ``from_pretrained`` names the dtype ``dtype`` from 4.56 on (``torch_dtype`` is deprecated).
DTYPE_KWARG = "dtype" if TRANSFORMERS >= Version("4.56") else "torch_dtype"


def with_cache(cache) -> dict:
    """``{cache keyword: cache}`` for a model call or ``generate``, whichever name this release uses."""
    return {CACHE_KWARG: cache}


def output_cache(output):
    """The cache returned by a model call (``output.cache`` from 5.24 on, else ``output.past_key_values``)."""
    return getattr(output, CACHE_KWARG)

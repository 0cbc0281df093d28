"""Which transformers generation is installed, and a record of library versions for run logs."""
from __future__ import annotations

import platform

import torch
import transformers
from packaging.version import Version

TRANSFORMERS = Version(transformers.__version__)
#: Cache objects (``DynamicCache``) exist; older versions pass tuples of tensors.
HAS_CACHE_CLASSES = TRANSFORMERS >= Version("4.36")
#: Attention modules take ``position_embeddings`` and call ``ALL_ATTENTION_FUNCTIONS`` (4.48+).
MODERN_ATTENTION = TRANSFORMERS >= Version("4.48")


def library_versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("datasets", "accelerate", "flash_attn", "gguf", "numpy"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


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

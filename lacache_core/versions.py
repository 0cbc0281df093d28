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

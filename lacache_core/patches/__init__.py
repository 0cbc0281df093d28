"""Position-shift attention: keys cached before RoPE and rotated by their cache slot.

One patch per transformers generation, shared by Llama, Mistral and Qwen2 (they have the same
attention layout), never one per method:

* :mod:`.modern`: transformers >= 4.48 (attention through ``ALL_ATTENTION_FUNCTIONS``: eager,
  sdpa, flash_attention_2 and any registered kernel).
* :mod:`.legacy`: transformers 4.33 to 4.47 (separate eager/sdpa/flash classes, tuple caches
  before 4.36).

The patch is installed on a model *instance* and is inert unless the cache passed in is a
:class:`lacache_core.cache.CompressedCache` (or, before 4.36, a tuple cache on a model patched for
the legacy harness), so a patched model still runs normally with an ordinary cache.
"""
from __future__ import annotations

import types

import torch

from ..rope import RopeTable, rotary_fn_from_module
from ..versions import MODERN_ATTENTION, TRANSFORMERS

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _decoder_layers(model: torch.nn.Module):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found; supported model types: {SUPPORTED_MODEL_TYPES}")
    return base, layers


def enable_position_shift(model: torch.nn.Module) -> torch.nn.Module:
    """Patch ``model``'s attention so that caches from :mod:`lacache_core` re-rotate keys by slot.

    Idempotent; returns ``model``. Raises ``ValueError`` for unsupported architectures.
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"position shift supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    base, layers = _decoder_layers(model)
    if MODERN_ATTENTION:
        from .modern import position_shift_forward
        table = RopeTable(rotary_fn_from_module(base.rotary_emb))
    else:
        from .legacy import position_shift_forward
        table = RopeTable(rotary_fn_from_module(layers[0].self_attn.rotary_emb))
    for layer in layers:
        attn = layer.self_attn
        if getattr(attn, "_lacache_original_forward", None) is None:
            attn._lacache_original_forward = attn.forward
        attn._lacache_rope = table
        attn.forward = types.MethodType(position_shift_forward, attn)
    model._lacache_position_shift = True
    return model


def is_position_shifted(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_lacache_position_shift", False))


__all__ = ["enable_position_shift", "is_position_shifted", "SUPPORTED_MODEL_TYPES", "TRANSFORMERS"]

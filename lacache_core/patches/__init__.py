"""Position shift: keys cached before RoPE and rotated where each method says its kept keys sit.

* :mod:`.modern`: transformers >= 4.48, through public extension points only (module hooks, the
  attention-function registry, the Cache API), for any RoPE decoder family.
* :mod:`.legacy`: transformers 4.33 to 4.47 (separate eager/sdpa/flash classes, tuple caches
  before 4.36), Llama, Mistral and Qwen2.

The patch is installed on a model *instance* and is inert unless the cache passed in is a
:class:`lacache_core.cache.CompressedCache` (or, before 4.36, a tuple cache on a model patched for
the legacy harness), so a patched model still runs normally with an ordinary cache.
"""
from __future__ import annotations

import types

import torch

from ..errors import ConfigError
from ..rope import Rotation, rotary_fn_from_module
from ..versions import MODERN_ATTENTION, TRANSFORMERS

#: Families the legacy patch (transformers < 4.48) knows; the modern one takes any RoPE decoder.
LEGACY_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _decoder_layers(model: torch.nn.Module):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ConfigError(f"model type {getattr(model.config, 'model_type', None)!r}: no decoder layers with "
                          "self_attn found; position shift needs a RoPE decoder")
    return base, layers


def enable_position_shift(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` run :class:`lacache_core.CompressedCache` objects (keys at their policy's positions).

    Idempotent; returns ``model``. Raises :class:`ConfigError` (a ``ValueError``, one line) for a model without RoPE.
    """
    base, layers = _decoder_layers(model)
    if MODERN_ATTENTION:
        from .modern import install

        install(model, base, layers)
    else:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in LEGACY_MODEL_TYPES:
            raise ConfigError(f"position shift on transformers {TRANSFORMERS} supports model types "
                              f"{LEGACY_MODEL_TYPES}, got {model_type!r}; use transformers >= 4.48 for others")
        from .legacy import position_shift_forward

        rotation = Rotation(rotary_fn_from_module(layers[0].self_attn.rotary_emb))
        for layer in layers:
            attn = layer.self_attn
            if getattr(attn, "_lacache_original_forward", None) is None:
                attn._lacache_original_forward = attn.forward
            attn._lacache_rotation = rotation
            attn.forward = types.MethodType(position_shift_forward, attn)
    model._lacache_position_shift = True
    return model


def is_position_shifted(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_lacache_position_shift", False))


__all__ = ["enable_position_shift", "is_position_shifted", "LEGACY_MODEL_TYPES", "TRANSFORMERS"]

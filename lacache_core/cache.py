"""Hugging Face cache objects that apply a :class:`CachePolicy` as the model runs.

:class:`CompressedCache` is a ``DynamicCache`` that stores keys *before* RoPE (the patched
attention rotates them by cache slot at every step) and compacts all layers right after the last
layer has appended its new tokens: the same moment the official harness calls its policy. It
therefore works unchanged in a plain forward loop and in ``model.generate(past_key_values=...)``,
and bounds memory in both.
"""
from __future__ import annotations

from typing import Optional

import torch

from .policies import CachePolicy, build_policy
from .policies.base import gather_layer
from .versions import HAS_CACHE_CLASSES

if HAS_CACHE_CLASSES:
    from transformers import DynamicCache
else:  # transformers < 4.36 has tuple caches only; see ppl_legacy/
    DynamicCache = object


class CompressedCache(DynamicCache):
    """A ``DynamicCache`` compacted by ``policy`` after every forward pass.

    The patched attention stores un-rotated keys through :meth:`update`, shows scoring policies
    each layer's queries and keys, and calls :meth:`end_of_layer`; after the last layer the policy
    picks the slots to keep and every layer is gathered once.

    Parameters
    ----------
    policy : CachePolicy
        Decides which slots each layer keeps (e.g. :class:`lacache_core.LaCache`).
    num_layers : int
        Decoder layers of the model (compaction runs after the last one).
    query_at_slot : bool
        Rotate queries at the slot their key occupies (``True``, correct and what generate needs)
        or at the ``position_ids`` the caller passes (reproduces a harness's own positions).
    """

    def __init__(self, policy: CachePolicy, num_layers: int, query_at_slot: bool = True):
        if not HAS_CACHE_CLASSES:
            raise RuntimeError("CompressedCache needs transformers >= 4.36; use ppl_legacy/ with tuple caches")
        super().__init__()
        policy.bind(num_layers)
        self.policy = policy
        self.num_layers = num_layers
        self.query_at_slot = query_at_slot
        self.peak_bytes = 0
        self.patched_forward_seen = not policy.position_shift
        # transformers >= 4.54 keeps per-layer objects, older versions two lists of tensors
        self._layered = isinstance(getattr(self, "layers", None), list)

    # -- storage access, across transformers' two DynamicCache layouts
    def _layer(self, i: int):
        if self._layered:
            return self.layers[i].keys, self.layers[i].values
        return self.key_cache[i], self.value_cache[i]

    def _set_layer(self, i: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if self._layered:
            self.layers[i].keys, self.layers[i].values = key, value
        else:
            self.key_cache[i], self.value_cache[i] = key, value

    def kv_bytes(self) -> int:
        """Bytes held by keys and values of all layers."""
        return kv_bytes(self)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == self.num_layers - 1 and not self.patched_forward_seen:
            raise RuntimeError(
                "this model's attention is not patched: call lacache_core.enable_position_shift(model) "
                "before running it with a CompressedCache"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def end_of_layer(self, layer_idx: int) -> None:
        """Called by the patched attention after each layer; compacts all layers after the last one."""
        if layer_idx == self.num_layers - 1:
            self._compact()

    def _compact(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.kv_bytes())
        n = self._layer(0)[0].shape[-2]
        keep = self.policy.compact(n, self.num_layers)
        if keep is None:
            return
        if isinstance(keep, torch.Tensor):  # one host-to-device copy per compaction, not one per layer
            keep = keep.to(self._layer(0)[0].device)
        for i in range(self.num_layers):
            self._set_layer(i, *gather_layer(*self._layer(i), keep[i]))

    def kept_positions(self):
        """Original token positions held: ``LongTensor [num_layers, n]``, or for the prefill-time methods
        a list with one ``[n_l]`` or ``[kv_heads, n_l]`` tensor per layer."""
        return self.policy.positions


def cache_layers(cache) -> list:
    """Per-layer ``(key, value)`` of any cache the harnesses use: tuples (transformers < 4.36),
    :class:`CompressedCache`, or a ``DynamicCache`` of either layout."""
    if cache is None:
        return []
    if isinstance(cache, (list, tuple)):
        return [tuple(layer[:2]) for layer in cache]
    if isinstance(cache, CompressedCache):
        return [cache._layer(i) for i in range(cache.num_layers)]
    if isinstance(getattr(cache, "layers", None), list):
        return [(layer.keys, layer.values) for layer in cache.layers if layer.keys is not None]
    return list(zip(cache.key_cache, cache.value_cache))


def kv_bytes(cache) -> int:
    """Bytes held by the keys and values of every layer of ``cache`` (any layout)."""
    return sum(t.numel() * t.element_size() for layer in cache_layers(cache) for t in layer)


def make_cache(method: str, model_or_config, query_at_slot: bool = True, **settings) -> CompressedCache:
    """Build a :class:`CompressedCache` for ``method`` sized to a model (or its config).

    Example
    -------
    >>> enable_position_shift(model)
    >>> cache = make_cache("lacache", model, cache_size=256, span=8, overlap=4)
    >>> model.generate(input_ids, past_key_values=cache, max_new_tokens=4096)
    """
    config = getattr(model_or_config, "config", model_or_config)
    policy = build_policy(method, **settings)
    return CompressedCache(policy, config.num_hidden_layers, query_at_slot=query_at_slot)


def prefill(model, input_ids: torch.Tensor, cache, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Feed a prompt into ``cache``, whole or ``chunk_size`` tokens at a time; returns the last logits ``[b, vocab]``.

    With a :class:`CompressedCache` of a decode-time method the policy compacts between chunks, so
    peak memory depends on the budget and the chunk, not on the prompt length. Prefill-time
    methods (SnapKV, ...) compress after the first forward pass, so they need the whole prompt at
    once (``chunk_size=None``).
    """
    import inspect

    from .errors import ConfigError

    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"--prefill_chunk_size must be >= 1, got {chunk_size}")
    if chunk_size is not None and isinstance(cache, CompressedCache) and cache.policy.prefill_only:
        raise ConfigError(f"--prefill_chunk_size cannot be used with --method {cache.policy.name}: it compresses the "
                          "whole prompt once")
    params = inspect.signature(model.forward).parameters
    # only the last position's logits are needed; a [prompt, vocab] logits tensor would dominate memory
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else (
        {"num_logits_to_keep": 1} if "num_logits_to_keep" in params else {})
    step = chunk_size or input_ids.shape[1]
    logits = None
    for start in range(0, input_ids.shape[1], step):
        out = model(input_ids[:, start:start + step], past_key_values=cache, use_cache=True, **extra)
        logits = out.logits[:, -1]
    return logits

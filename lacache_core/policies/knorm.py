"""Key-norm eviction (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV
Cache Compression", arXiv 2406.11430): keys with a low L2 norm draw high attention, so keep those.

The score needs no attention at all. Two variants, as in the references:

* :class:`KNorm` (``knorm``), prefill-time: KVCache-Factory's ``L2NormCluster``
  (``pyramidkv/pyramidkv_utils.py``) and kvpress's ``KnormPress``. After the prompt each layer keeps,
  per KV head, the ``cache_size`` keys of lowest norm; the first ``skip_layers`` layers keep the
  prompt whole (KVCache-Factory's default ``skip_layers=[0, 1]``).
* :class:`KNormDecode` (``knorm_decode``), decode-time: the same score applied whenever a layer
  holds more than ``cache_size`` slots, as kvpress's ``DecodingPress(KnormPress())`` does every
  ``compression_interval`` steps; here at every step, so the budget is a hard bound like every
  other decode-time method's.

Rotation keeps a key's norm (RoPE turns pairs of channels), so scoring rotated keys is exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch

from .base import CachePolicy, param
from .prefill import PrefillPolicy
from .scoring import ensure_layer, with_protected


def key_norms(key: torch.Tensor) -> torch.Tensor:
    """L2 norm of every key, averaged over the batch: ``[b, kvh, n, d] -> [kvh, n]`` (float32)."""
    return key.float().norm(dim=-1).mean(0)


def keep_lowest(norms: torch.Tensor, start_size: int, recent_window: int, budget: int) -> torch.Tensor:
    """Per head, the first ``start_size`` and last ``recent_window`` slots plus the lowest ``norms`` between.

    ``norms`` is ``[kvh, n]``; returns ``LongTensor [kvh, budget]``, increasing along the last dimension.
    """
    n = norms.shape[-1]
    middle = norms[:, start_size:n - recent_window]
    low = torch.topk(middle, budget - start_size - recent_window, dim=-1, largest=False).indices + start_size
    return with_protected(low, start_size, recent_window, n)


@dataclass
class KNorm(PrefillPolicy):
    """After the prompt, keep per KV head the keys of lowest L2 norm (prefill-time).

    With the defaults (no sinks, no window, the first two layers whole) this is KVCache-Factory's
    ``L2NormCluster``. Compresses once after the prompt; the cache then grows during decoding.

    Parameters
    ----------
    start_size : int
        Leading prompt tokens always kept (0 in the reference).
    window_size : int
        Last prompt tokens always kept (0 in the reference).
    skip_layers : int
        The first ``skip_layers`` layers keep the whole prompt (2 in the reference).
    """

    name: ClassVar[str] = "knorm"
    per_head: ClassVar[bool] = True

    start_size: int = param(0, low=0)
    window_size: int = param(0, low=0)
    skip_layers: int = param(2, low=0)

    def layer_budgets(self, num_layers: int, prompt_len: Optional[int] = None) -> List[int]:
        whole = self.cache_size if prompt_len is None else max(prompt_len, self.cache_size)
        return [whole if i < self.skip_layers else self.cache_size for i in range(num_layers)]

    def max_cache_len(self, num_layers: int) -> Optional[int]:
        return None if self.skip_layers > 0 else self.cache_size  # skipped layers hold the whole prompt

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._window_scores, layer)
        if not self._done:
            self._window_scores[layer] = key_norms(key)

    def layer_keep(self, layer: int, n: int, budget: int) -> torch.Tensor:
        return keep_lowest(self._window_scores[layer], self.start_size, self.window_size, budget)


@dataclass
class KNormDecode(CachePolicy):
    """Whenever a layer holds more than ``cache_size`` slots, keep per KV head the keys of lowest norm.

    Parameters
    ----------
    cache_size : int
        Slots per layer and head.
    start_size : int
        Leading tokens always kept (0: kvpress's ``DecodingPress(KnormPress())`` protects none).
    recent_window : int
        Newest tokens always kept (0 in the reference).
    """

    name: ClassVar[str] = "knorm_decode"
    observes: ClassVar[bool] = True

    cache_size: int = param(256, low=lambda p: p.start_size + p.recent_window + 1)
    start_size: int = param(0, low=0)
    recent_window: int = param(0, low=0)

    _norms: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def _reset_state(self) -> None:
        self._norms = []

    def max_cache_len(self, num_layers: int) -> int:
        return self.cache_size

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._norms, layer)
        held = self._norms[layer]
        old = 0 if held is None else held.shape[-1]
        new = key_norms(key[:, :, old:])  # a key's norm never changes: score only the new ones
        self._norms[layer] = new if held is None else torch.cat([held, new], -1)

    def keep(self, layer: int, n: int):
        if n <= self.cache_size:
            return None
        row = keep_lowest(self._norms[layer], self.start_size, self.recent_window, self.cache_size)
        self._norms[layer] = self._norms[layer].gather(-1, row)
        return row

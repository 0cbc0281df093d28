"""Shared machinery of the prefill-time methods (SnapKV, PyramidKV, PyramidInfer).

They compress the prompt once, in the first forward pass (each layer right after it attended),
and let the cache grow during decoding, as in their papers. Layers may then hold different
numbers of slots, and SnapKV and PyramidKV choose slots per KV head (``[kv_heads, n_keep]``
answers to :meth:`CachePolicy.keep`). Kept keys stay at their original positions, as in the
reference implementations.

As in KVCache-Factory's ``SnapKVCluster`` (``pyramidkv/pyramidkv_utils.py``), the window's queries
score the *prefix* only (the prompt before the window): the scores, and any pooling of them, stop
at the window's edge, and the window is kept whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch

from ..errors import ConfigError
from .base import CachePolicy, param
from .scoring import attention_probs, ensure_layer, with_protected


@dataclass
class PrefillPolicy(CachePolicy):
    """Base class: compress once after the prompt; subclasses implement :meth:`layer_keep`.

    Parameters
    ----------
    cache_size : int
        Slots each layer keeps after the prompt, on average over layers (sinks and window included).
    start_size : int
        Leading prompt tokens always kept.
    window_size : int
        The last prompt tokens: their queries score the rest, and they are always kept.
    """

    observes: ClassVar[bool] = True
    prefill_only: ClassVar[bool] = True
    per_head: ClassVar[bool] = False

    cache_size: int = param(256, low=lambda p: p.start_size + p.window_size + 1)
    start_size: int = param(4, low=0)
    window_size: int = param(32, low=1)

    _window_scores: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    _done: bool = field(default=False, init=False, repr=False)

    def _reset_state(self) -> None:
        self._window_scores, self._done = [], False

    def layer_budgets(self, num_layers: int, prompt_len: Optional[int] = None) -> List[int]:
        """Slots each layer keeps after a prompt of ``prompt_len`` tokens (sinks and window included).

        ``prompt_len=None``: the budgets of a long prompt (the largest a layer can be given). A layer
        whose budget is at least the prompt keeps it whole.
        """
        return [self.cache_size] * num_layers

    def max_cache_len(self, num_layers: int) -> int:
        return max(self.layer_budgets(num_layers))

    def validate(self, num_layers: int) -> None:
        low = min(self.layer_budgets(num_layers))
        if low < self.start_size + self.window_size:
            raise ConfigError(f"{type(self).__name__}.cache_size {self.cache_size} leaves a layer {low} slots, fewer than "
                              f"start_size + window_size = {self.start_size + self.window_size}; raise "
                              f"{type(self).__name__}.cache_size")

    # -- scoring: the attention the last ``window_size`` prompt queries pay to each prompt token
    def observe(self, layer, query, key, scaling):
        ensure_layer(self._window_scores, layer)
        if self._done:
            return
        window = min(self.window_size, query.shape[2])
        probs = attention_probs(query[:, :, -window:], key, scaling)  # [b, kvh, w, n]
        prefix = probs[..., :key.shape[2] - self.window_size].sum(2)  # the window's attention to the prefix
        self._window_scores[layer] = self.pool(prefix).mean(0)  # [kvh, n - w]

    def pool(self, scores: torch.Tensor) -> torch.Tensor:
        """Smooth ``[b, kvh, n - w]`` prefix scores along tokens (identity by default)."""
        return scores

    def layer_keep(self, layer: int, n: int, budget: int) -> torch.Tensor:
        """Slots to keep: sinks, the best-scored prefix tokens, the window. ``[budget]`` or ``[kvh, budget]``."""
        scores = self._window_scores[layer]  # [kvh, n - w]
        if not self.per_head:
            scores = scores.mean(0, keepdim=True)
        w, s = self.window_size, self.start_size
        keep = with_protected(torch.topk(scores[:, s:], budget - s - w, dim=-1).indices + s, s, w, n)
        return keep if self.per_head else keep[0]

    def keep(self, layer: int, n: int):
        if self._done:
            return None
        if layer == self._num_layers - 1:
            self._done = True  # the first forward pass (the prompt) ends with this layer
        budget = self.layer_budgets(self._num_layers, n)[layer]
        row = None if n <= budget else self.layer_keep(layer, n, budget)
        ensure_layer(self._window_scores, layer)
        self._window_scores[layer] = None
        return row

"""H2O (Zhang et al., NeurIPS 2023): heavy hitters by accumulated attention, plus recent tokens."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch

from .base import param
from .merging import MergesEvicted
from .scoring import attention_mass, ensure_layer, keep_top, pad_to


@dataclass
class H2O(MergesEvicted):
    """Keep sinks, a recent window, and the tokens with the largest attention mass accumulated so far.

    Parameters
    ----------
    cache_size : int
        Slots per layer ``C``.
    start_size : int
        Leading tokens always kept (the same sinks as every method).
    recent_ratio : float
        Share of ``C - start_size`` given to the recent window (H2O's default: half).

    Scores are the attention each token received from every query since it entered the cache
    (prefill included), averaged over heads, one ranking per layer.
    """

    name: ClassVar[str] = "h2o"
    observes: ClassVar[bool] = True

    cache_size: int = param(256, low=lambda p: p.start_size + 2)
    start_size: int = param(4, low=0)
    recent_ratio: float = param(0.5, low=0.0, below=1.0)

    _scores: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def _reset_state(self) -> None:
        self._scores = []

    @property
    def recent_size(self) -> int:
        return int((self.cache_size - self.start_size) * self.recent_ratio)

    def max_cache_len(self, num_layers: int) -> int:
        return self.cache_size

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._scores, layer)
        n = key.shape[2]
        self._scores[layer] = pad_to(self._scores[layer], n, key.device) + attention_mass(query, key, scaling)

    def keep(self, layer: int, n: int):
        if n <= self.cache_size:
            return None
        row = keep_top(self._scores[layer], n, self.start_size, self.recent_size, self.cache_size)
        self._scores[layer] = self._scores[layer][row]
        return row

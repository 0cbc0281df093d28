"""TOVA (Oren et al., 2024): keep the tokens the current query attends to most."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch

from .base import CachePolicy, param
from .scoring import attention_probs, ensure_layer, keep_top


@dataclass
class TOVA(CachePolicy):
    """When over budget, drop per layer the tokens with the lowest attention from the newest query.

    Parameters
    ----------
    cache_size : int
        Slots per layer.
    start_size : int
        Leading tokens never dropped (the same sinks as every method).

    The score is the newest query's attention averaged over heads (one ranking per layer); one
    token over budget is dropped per decoding step. The first ``start_size`` tokens are never
    dropped, as for every method here.
    """

    name: ClassVar[str] = "tova"
    observes: ClassVar[bool] = True

    cache_size: int = param(256, low=lambda p: p.start_size + 1)
    start_size: int = param(4, low=0)

    _last: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def _reset_state(self) -> None:
        self._last = []

    def max_cache_len(self, num_layers: int) -> int:
        return self.cache_size

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._last, layer)
        self._last[layer] = attention_probs(query[:, :, -1:], key, scaling)[:, :, -1].mean((0, 1))

    def keep(self, layer: int, n: int):
        if n <= self.cache_size:
            return None
        return keep_top(self._last[layer], n, self.start_size, 0, self.cache_size)

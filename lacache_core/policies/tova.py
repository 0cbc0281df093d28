"""TOVA (Oren et al., 2024): keep the tokens the current query attends to most."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch

from .base import CachePolicy, check_int
from .scoring import attention_probs, ensure_layer, keep_top


@dataclass
class TOVA(CachePolicy):
    """When over budget, drop per layer the tokens with the lowest attention from the newest query.

    The score is the newest query's attention averaged over heads (one ranking per layer); one
    token over budget is dropped per decoding step. The first ``start_size`` tokens are never
    dropped, as for every method here.
    """

    name: ClassVar[str] = "tova"
    observes: ClassVar[bool] = True

    cache_size: int = 256
    start_size: int = 4

    _last: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        check_int("start_size", self.start_size, 0)
        check_int("cache_size", self.cache_size, self.start_size + 1)

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

"""LSH-E ("LSH Tells You What to Discard", ICLR 2025): evict by SimHash similarity to the query."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch

from .base import CachePolicy, param
from .scoring import ensure_layer, keep_top


@dataclass
class LSHE(CachePolicy):
    """Score each cached key by the Hamming similarity of its SimHash to the current query's.

    Parameters
    ----------
    cache_size : int
        Slots per layer.
    start_size : int
        Global (sink) tokens never evicted (LSH-E's ``global_tokens``, default 4).
    recent_window : int
        Most recent tokens never evicted (LSH-E's ``recent_window``).
    lsh_dim : int
        Hash bits: signs of ``lsh_dim`` random Gaussian projections.
    lsh_seed : int
        Seed of those projections.

    The score of a key is ``lsh_dim`` minus the Hamming distance between its hash and the newest
    query's, averaged over the query heads that share its KV head, then over heads (one ranking per
    layer). Keys are hashed as the attention sees them (rotated by their cache slot).
    """

    name: ClassVar[str] = "lshe"
    observes: ClassVar[bool] = True

    cache_size: int = param(256, low=lambda p: p.start_size + p.recent_window + 1)
    start_size: int = param(4, low=0)
    recent_window: int = param(32, low=0)
    lsh_dim: int = param(8, low=1, high=64)
    lsh_seed: int = param(0, low=0)

    _sim: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    _proj: Optional[torch.Tensor] = field(default=None, init=False, repr=False)

    def _reset_state(self) -> None:
        self._sim, self._proj = [], None

    def max_cache_len(self, num_layers: int) -> int:
        return self.cache_size

    def _hash(self, x: torch.Tensor) -> torch.Tensor:
        if self._proj is None or self._proj.device != x.device or self._proj.shape[0] != x.shape[-1]:
            g = torch.Generator().manual_seed(self.lsh_seed)
            self._proj = torch.randn(x.shape[-1], self.lsh_dim, generator=g).to(x.device)
        return (x.float() @ self._proj) > 0

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._sim, layer)
        b, heads, _, _ = query.shape
        kv_heads = key.shape[1]
        q_hash = self._hash(query[:, :, -1]).view(b, kv_heads, heads // kv_heads, 1, self.lsh_dim)
        k_hash = self._hash(key)[:, :, None]  # [b, kvh, 1, n, bits]
        agree = (q_hash == k_hash).sum(-1).float()  # [b, kvh, g, n]
        self._sim[layer] = agree.mean((0, 1, 2))

    def keep(self, layer: int, n: int):
        if n <= self.cache_size:
            return None
        return keep_top(self._sim[layer], n, self.start_size, self.recent_window, self.cache_size)

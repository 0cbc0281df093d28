"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus a window of recent tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .base import param
from .merging import MergesEvicted


@dataclass
class StreamingLLM(MergesEvicted):
    """Keep the first ``start_size`` tokens and the last ``recent_size`` tokens.

    Positions are cache slots (keys are re-rotated), as in the StreamingLLM paper.

    Parameters
    ----------
    start_size : int
        Attention sinks kept forever.
    recent_size : int
        Most recent tokens kept. The cache holds at most ``start_size + recent_size`` slots
        (:func:`build_policy` given a ``cache_size`` sets ``cache_size - start_size``).
    """

    name: ClassVar[str] = "streamingllm"
    default_positions: ClassVar[str] = "slot"

    start_size: int = param(4, low=0)
    recent_size: int = param(252, low=1)

    @property
    def cache_size(self) -> int:
        return self.start_size + self.recent_size

    def max_cache_len(self, num_layers: int) -> int:
        return self.cache_size

    def select(self, n: int, num_layers: int) -> Optional[torch.Tensor]:
        if n <= self.cache_size:
            return None
        row = torch.cat([torch.arange(self.start_size), torch.arange(n - self.recent_size, n)])
        return row.expand(num_layers, row.shape[0])

    # A layer holds the sinks and the newest tokens, so its positions follow from the count it holds and the tokens
    # seen: nothing to carry along at each step's compaction.
    def apply(self, layer: int, keep) -> None:
        if keep is not None:
            self._held[layer] = keep.shape[-1]

    def layer_positions(self, layer: int) -> torch.Tensor:
        held, seen = self._held[layer], self._seen
        sinks = min(self.start_size, held)
        self._pending[layer] = 0
        return torch.cat([torch.arange(sinks), torch.arange(seen - (held - sinks), seen)]).to(self._device)

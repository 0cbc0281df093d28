"""ChunkKV (Liu et al., 2025, arXiv 2502.00299): keep whole chunks of the prompt, ranked by any token scorer.

Followed: kvpress's ``ChunkKVPress`` (``kvpress/presses/chunkkv_press.py``, NVIDIA/kvpress @ 8bb29b9), which wraps
any ``ScorerPress``. The scorer's per-head scores are summed over heads; the prompt is cut into chunks of
``chunk_length`` tokens (the last one may be shorter); a chunk scores the mean of its tokens; the best chunks are
kept, the same for every head.

Here the scorer's protected tokens (sinks and window; SnapKV's 32-token window) are kept whole and the chunks cut
from the tokens between them, where kvpress chunks the whole prompt and gives the window's chunks the highest
score. ``max(1, (cache_size - protected) // chunk_length)`` chunks are kept, so the cache never exceeds its budget;
kvpress keeps ``max(1, int(chunks * (1 - compression_ratio)))``, at most one chunk more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import param
from .composed import ComposedPolicy


def chunk_keep(scores: torch.Tensor, start: int, chunk_length: int, chunks: int) -> torch.Tensor:
    """Slots of the ``chunks`` best chunks of ``scores`` (``[m]``, the tokens from slot ``start`` on), chunks cut
    every ``chunk_length`` tokens, the last one possibly shorter, each scored by its mean: sorted ``LongTensor``."""
    m = scores.shape[0]
    whole = m // chunk_length
    means = scores[:whole * chunk_length].view(whole, chunk_length).mean(-1)
    if m % chunk_length:
        means = torch.cat([means, scores[whole * chunk_length:].mean()[None]])
    best = torch.topk(means, min(chunks, means.shape[0])).indices
    slots = [torch.arange(i * chunk_length, min((i + 1) * chunk_length, m), device=scores.device) for i in best.tolist()]
    return torch.cat(slots).sort().values + start


@dataclass
class ChunkKV(ComposedPolicy):
    """After the prompt, keep the whole chunks of tokens that ``scorer`` ranks highest, the same for every head
    (kvpress's ChunkKV experiments use SnapKV, the default).

    Parameters
    ----------
    chunk_length : int
        Tokens per chunk (20 in kvpress).
    """

    name: ClassVar[str] = "chunkkv"

    chunk_length: int = param(20, low=1)

    def check_budget(self, protected: int) -> None:
        if self.cache_size < protected + self.chunk_length:
            raise ConfigError(f"ChunkKV.cache_size {self.cache_size} holds no chunk of {self.chunk_length} beside "
                              f"{self.scorer}'s {protected} sinks and window slots; raise ChunkKV.cache_size or "
                              "lower ChunkKV.chunk_length")

    def layer_keep(self, layer: int, n: int, budget: int) -> torch.Tensor:
        s, w = self.protected["start_size"], self.protected["window_size"]
        scores = self._window_scores[layer].sum(0)[s:]  # summed over heads: [n - s - w]
        chunks = max(1, (budget - s - w) // self.chunk_length)
        middle = chunk_keep(scores, s, self.chunk_length, chunks)
        return torch.cat([torch.arange(s, device=middle.device), middle, torch.arange(n - w, n, device=middle.device)])

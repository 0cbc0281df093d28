"""ChunkKV (Liu et al., 2025, arXiv 2502.00299): keep whole chunks of the prompt, ranked by any token scorer.

Followed: kvpress's ``ChunkKVPress`` (``kvpress/presses/chunkkv_press.py``, NVIDIA/kvpress @ 8bb29b9), which wraps
any ``ScorerPress``. The scorer's per-head scores are summed over heads; the prompt is cut into chunks of
``chunk_length`` tokens (the last one may be shorter); a chunk scores the mean of its tokens; the best chunks are
kept, the same for every head.

Here the scorer is any of our prefill-time scoring methods (``scorer``), built with its own defaults and this
method's ``cache_size``. Its protected tokens (sinks and window; SnapKV's 32-token window) are kept whole and the
chunks cut from the tokens between them, where kvpress chunks the whole prompt and gives the window's chunks the
highest score. ``max(1, (cache_size - protected) // chunk_length)`` chunks are kept, so the cache never exceeds its
budget; kvpress keeps ``max(1, int(chunks * (1 - compression_ratio)))``, at most one chunk more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch

from ..errors import ConfigError
from .base import param
from .expected_attention import ExpectedAttention
from .keydiff import KeyDiff
from .lagkv import LagKV
from .prefill import PrefillPolicy
from .snapkv import SnapKV
from .scoring import ensure_layer

SCORERS = {cls.name: cls for cls in (SnapKV, KeyDiff, LagKV, ExpectedAttention)}


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
class ChunkKV(PrefillPolicy):
    """After the prompt, keep the whole chunks of tokens that ``scorer`` ranks highest, the same for every head.

    Parameters
    ----------
    scorer : {"snapkv", "keydiff", "lagkv", "expected_attention"}
        The prefill-time method whose per-token scores rank the chunks, with its own defaults (kvpress's ChunkKV
        experiments use SnapKV). KNorm is not offered: it keeps its *lowest* scores.
    chunk_length : int
        Tokens per chunk (20 in kvpress).
    start_size : int, optional
        Leading tokens kept apart from the chunks (``None``: the scorer's own, 0 for SnapKV).
    window_size : int, optional
        Last prompt tokens kept apart from the chunks (``None``: the scorer's own, 32 for SnapKV).
    """

    name: ClassVar[str] = "chunkkv"
    observes_values: ClassVar[bool] = True

    cache_size: int = param(256, low=1)
    start_size: Optional[int] = param(None, low=0)
    window_size: Optional[int] = param(None, low=0)
    scorer: Literal["snapkv", "keydiff", "lagkv", "expected_attention"] = "snapkv"
    chunk_length: int = param(20, low=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        scorer = SCORERS[self.scorer]
        given = {"start_size": self.start_size, "window_size": self.window_size}
        given = {k: getattr(scorer, k) if v is None else v for k, v in given.items()}  # a field's class default
        protected = given["start_size"] + given["window_size"]
        if self.cache_size < protected + self.chunk_length:
            raise ConfigError(f"ChunkKV.cache_size {self.cache_size} holds no chunk of {self.chunk_length} beside "
                              f"{self.scorer}'s {protected} sinks and window slots; raise ChunkKV.cache_size or "
                              "lower ChunkKV.chunk_length")
        self.inner = scorer(cache_size=self.cache_size, **given)

    def validate(self, num_layers: int) -> None:
        """Nothing more than :meth:`__post_init__` checked: every layer has the same budget."""

    def _reset_state(self) -> None:
        super()._reset_state()
        self.inner.reset()

    def observe_values(self, layer, value, rotation):
        if self.inner.observes_values:
            self.inner.observe_values(layer, value, rotation)

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._window_scores, layer)
        if self._done or key.shape[2] <= self.cache_size:
            return
        self.inner.observe(layer, query, key, scaling)
        self._window_scores[layer], self.inner._window_scores[layer] = self.inner._window_scores[layer], None

    def layer_keep(self, layer: int, n: int, budget: int) -> torch.Tensor:
        s, w = self.inner.start_size, self.inner.window_size
        scores = self._window_scores[layer].sum(0)[s:]  # summed over heads: [n - s - w]
        chunks = max(1, (budget - s - w) // self.chunk_length)
        middle = chunk_keep(scores, s, self.chunk_length, chunks)
        return torch.cat([torch.arange(s, device=middle.device), middle, torch.arange(n - w, n, device=middle.device)])

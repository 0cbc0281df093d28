"""R-KV (Cai et al., 2025, arXiv 2505.24133): decode-time compression for long reasoning, by importance minus redundancy.

Followed: Zefan-Cai/R-KV, ``rkv/compression/r1_kv.py`` (``R1KV.update_kv``) and ``rkv/utils.py``
(``compute_attention_scores``, ``cal_similarity``) at d15c976; the compaction rule (a cache of ``budget + buffer``
compacted back to ``budget``) as in the repository's later ``r1_kv.py`` (``should_compact``, commit 31cf555), since at
d15c976 it is a global step counter in ``rkv/modeling.py``.

Per KV head, every cached token but the newest ``window_size`` gets

* an importance: the attention of the newest ``window_size`` queries (kept from the steps that made them), the
  logits maxed over each KV head's query heads before the softmax, the softmax over those tokens alone, averaged over
  the queries and max-pooled over ``kernel_size`` neighbours;
* a redundancy: the keys' cosine similarities, each key's self-similarity and its similarity to its newest
  look-alike (cosine above ``similarity_threshold``) zeroed, averaged over all keys, softmaxed over tokens;

and the ``cache_size - window_size`` tokens of highest ``mix_lambda * importance - (1 - mix_lambda) * redundancy``
are kept with the window. Keys stay at their original positions, as the reference never re-rotates them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import CachePolicy, param
from .scoring import ensure_layer, with_protected


def redundancy(key: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[b, kvh, n, d] -> [b, kvh, n]``: how much each key repeats the others, softmaxed over the ``n`` keys.

    Row ``i`` of the cosine matrix loses its diagonal and its entry for the newest key ``j`` with cosine above
    ``threshold`` (the first key where none is); column ``j``'s mean over the rows is key ``j``'s redundancy. A key
    that has newer look-alikes keeps their similarity to it, so the oldest of a group of repeats is the most redundant.
    """
    unit = key.float() / (key.float().norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    slots = torch.arange(sim.shape[-1], device=sim.device).expand_as(sim)
    newest_alike = torch.where(sim > threshold, slots, 0).max(-1, keepdim=True).values
    return sim.scatter(-1, newest_alike, 0.0).mean(-2).softmax(-1)


@dataclass
class RKV(CachePolicy):
    """Whenever a layer reaches ``cache_size + buffer`` slots, keep per KV head the window and the tokens of best
    importance-minus-redundancy, back to ``cache_size`` slots (a prompt longer than ``cache_size`` at once).

    Parameters
    ----------
    cache_size : int
        Slots per layer and head after a compaction, window included (R-KV's budget).
    buffer : int
        Slots a layer grows by before it is compacted again (128 in R-KV; 1 compacts at every step over budget).
    window_size : int
        Newest tokens always kept; their queries score the others (8 in R-KV).
    start_size : int
        Leading tokens always kept (0: R-KV protects none).
    kernel_size : int
        Width of the max-pooling of the importance over neighbouring tokens (odd; 7 in R-KV).
    mix_lambda : float
        Weight of the importance against the redundancy (0.07 in R-KV's code; its README says 0.1).
    similarity_threshold : float
        Cosine above which two keys are look-alikes (0.5 in R-KV).
    """

    name: ClassVar[str] = "rkv"
    observes: ClassVar[bool] = True

    cache_size: int = param(128, low=lambda p: p.start_size + p.window_size + 1)
    buffer: int = param(128, low=1)
    window_size: int = param(8, low=1)
    start_size: int = param(0, low=0)
    kernel_size: int = param(7, low=1)
    mix_lambda: float = param(0.07, low=0.0, high=1.0)
    similarity_threshold: float = param(0.5, low=-1.0, high=1.0)

    _queries: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    _scores: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    _pass_tokens: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"RKV.kernel_size must be odd (pooling keeps the length), got {self.kernel_size}")

    def _reset_state(self) -> None:
        self._queries, self._scores, self._pass_tokens = [], [], 0

    def max_cache_len(self, num_layers: int) -> int:
        return self.cache_size + self.buffer - 1

    def due(self, n: int) -> bool:
        """Whether a layer holding ``n`` slots after this pass is compacted: at ``cache_size + buffer``, or after a
        pass of several tokens (a prompt) that left it over ``cache_size``."""
        return n >= self.cache_size + self.buffer or (self._pass_tokens > 1 and n > self.cache_size)

    def importance(self, queries: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """``[b, kvh, n - w]``: the window's attention to the older tokens, pooled (``queries``: ``[b, heads, w, d]``)."""
        b, heads, w, d = queries.shape
        kv_heads, n = key.shape[1], key.shape[2]
        grouped = queries.float().view(b, kv_heads, heads // kv_heads, w, d)
        logits = torch.einsum("bkgqd,bknd->bkgqn", grouped, key.float()).max(2).values * scaling
        probs = logits[..., :n - self.window_size].softmax(-1).mean(2)
        pooled = F.max_pool1d(probs.reshape(b * kv_heads, 1, -1), self.kernel_size, stride=1,
                              padding=self.kernel_size // 2)
        return pooled.view(b, kv_heads, -1)

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._queries, layer)
        ensure_layer(self._scores, layer)
        held = self._queries[layer]
        self._queries[layer] = (query if held is None else torch.cat([held, query], 2))[:, :, -self.window_size:]
        if layer == 0:
            self._pass_tokens = query.shape[2]
        n = key.shape[2]
        if not self.due(n):
            return
        w = self.window_size
        mixed = (self.mix_lambda * self.importance(self._queries[layer], key, scaling)
                 - (1 - self.mix_lambda) * redundancy(key, self.similarity_threshold)[..., :n - w])
        self._scores[layer] = mixed.mean(0)  # [kvh, n - w]

    def keep(self, layer: int, n: int):
        if not self.due(n):
            return None
        scores, s, w = self._scores[layer], self.start_size, self.window_size
        self._scores[layer] = None
        chosen = torch.topk(scores[:, s:], self.cache_size - s - w, dim=-1).indices + s
        return with_protected(chosen, s, w, n)

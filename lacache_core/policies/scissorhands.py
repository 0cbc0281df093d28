"""Scissorhands (Liu et al., NeurIPS 2023, "Scissorhands: Exploiting the Persistence of Importance
Hypothesis for LLM KV Cache Compression at Test Time", arXiv 2305.17118).

Tokens that drew attention before keep drawing it ("persistence of importance"), so a token's
importance is the attention it received over a history of queries, and under a fixed budget the
least important ones go. This follows KVCache-Factory's selector (``pyramidkv/scissorhands.py``):
importance is accumulated over steps with an optional decay (``old * importance_decay + new``), a forward
pass of several queries contributes its last ``history_window`` of them, sinks and the newest
tokens are protected, and the rest is chosen per KV head by top-k or by sampling. The paper counts
how often a token's attention falls below average within a history window and drops ``m`` tokens
at a time; KVCache-Factory's code sums the attention itself and keeps a fixed budget, and we follow
the code, compacting at every step the layer is over budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Literal, Optional

import torch

from .base import CachePolicy, param
from .scoring import attention_probs, ensure_layer, sample_by_score, seeded_generator, with_protected


@dataclass
class Scissorhands(CachePolicy):
    """Keep, per KV head, the tokens of highest persistent importance under a fixed budget.

    Parameters
    ----------
    cache_size : int
        Slots per layer and head.
    start_size : int
        Leading tokens always kept (0 in the reference).
    recent_window : int
        Newest tokens always kept (0 in the reference).
    history_window : int
        Of a forward pass with several queries (the prompt), only the last ``history_window`` add to
        the importance; 0: all of them (the reference's ``None``).
    importance_decay : float
        Factor applied to the importance accumulated so far before each forward pass adds its own
        (1: plain accumulation, the reference's default).
    selection : {"topk", "sample"}
        Keep the most important tokens, or sample them with probability ``softmax(importance / temperature)``.
    temperature : float
        Temperature of the sampling (<= 0: uniform).
    random_seed : int
        Seed of the sampling: the draws depend on it, the layer and the tokens seen, nothing else.
    """

    name: ClassVar[str] = "scissorhands"
    observes: ClassVar[bool] = True

    cache_size: int = param(256, low=lambda p: p.start_size + p.recent_window + 1)
    start_size: int = param(0, low=0)
    recent_window: int = param(0, low=0)
    history_window: int = param(0, low=0)
    importance_decay: float = param(1.0, low=0.0, high=1.0)
    selection: Literal["topk", "sample"] = "topk"
    temperature: float = param(1.0)
    random_seed: int = param(0, low=0)

    _importance: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def _reset_state(self) -> None:
        self._importance = []

    def max_cache_len(self, num_layers: int) -> int:
        return self.cache_size

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._importance, layer)
        if self.history_window:
            query = query[:, :, -self.history_window:]
        current = attention_probs(query, key, scaling).sum(2).mean(0)  # [kvh, n]
        held = self._importance[layer]
        if held is not None:
            pad = current.new_zeros(held.shape[0], current.shape[-1] - held.shape[-1])
            current = current + self.importance_decay * torch.cat([held, pad], -1)
        self._importance[layer] = current

    def keep(self, layer: int, n: int):
        if n <= self.cache_size:
            return None
        importance = self._importance[layer]
        s, r = self.start_size, self.recent_window
        middle = importance[:, s:n - r]
        count = self.cache_size - s - r
        if self.selection == "topk":
            chosen = torch.topk(middle, count, dim=-1).indices
        else:
            generator = seeded_generator(self.random_seed, layer, self.seen)
            chosen = torch.stack([sample_by_score(head, count, self.temperature, generator) for head in middle])
        row = with_protected(chosen + s, s, r, n)
        self._importance[layer] = importance.gather(-1, row)
        return row

"""AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference", arXiv 2407.11550): SnapKV's scores, with the layer's budget shared out
among its heads by those scores.

This follows KVCache-Factory's ``AdaKVCluster`` (``pyramidkv/pyramidkv_utils.py``, adapted there
from FFY0/AdaKV). With ``B = cache_size - window_size`` prefix slots per head on average:

1. each head's pooled window scores are sorted; with ``normalize``, head ``h``'s are scaled by the
   share of its score mass that its own top ``B`` hold;
2. the top ``kv_heads * B`` of all heads' (scaled) scores together decide how many each head gets;
3. a floor: head ``h`` keeps ``round(count_h * (1 - floor_ratio) + int(B * floor_ratio))`` of its
   best prefix tokens, plus the whole window.

Heads then hold different numbers of slots. :class:`lacache_core.CompressedCache` stores each head
at its own length (the memory is really saved, and ``kv_bytes`` counts what is stored), and masks the
padding of the padded view it hands the attention kernel, one layer at a time (eager and sdpa;
flash kernels are refused). kvpress's ``AdaKVPress`` instead keeps every head at the same length and
masks the dropped keys, so it saves no memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

import torch

from .base import param
from .scoring import with_protected
from .snapkv import SnapKV


def head_counts(scores: torch.Tensor, budget: int, normalize: bool) -> torch.Tensor:
    """How many of ``budget * kv_heads`` slots each head wins: ``scores [kv_heads, m]`` -> ``LongTensor [kv_heads]``."""
    heads, m = scores.shape
    ranked = scores.sort(-1, descending=True).values
    if normalize:
        ranked = ranked * (ranked[:, :budget].sum(-1, keepdim=True) / ranked.sum(-1, keepdim=True))
    winners = ranked.reshape(-1).topk(heads * budget).indices // m
    return torch.bincount(winners, minlength=heads)


@dataclass
class AdaKV(SnapKV):
    """SnapKV's per-head choice with per-head budgets that follow the scores (the layer's total unchanged).

    Parameters
    ----------
    floor_ratio : float
        Share of each head's average budget it keeps whatever the scores (KVCache-Factory's ``floor_ratio``, 0.2).
    normalize : bool
        Scale each head's scores by the share of its score mass in its own top ``B`` before comparing heads.
    """

    name: ClassVar[str] = "adakv"
    ragged: ClassVar[bool] = True

    floor_ratio: float = param(0.2, low=0.0, high=1.0)
    normalize: bool = True

    def max_cache_len(self, num_layers: int) -> Optional[int]:
        return None  # one head may keep up to the whole prompt

    def layer_keep(self, layer: int, n: int, budget: int) -> List[torch.Tensor]:
        scores = self._window_scores[layer]  # [kvh, n - w]
        base = budget - self.start_size - self.window_size
        counts = head_counts(scores[:, self.start_size:], base, self.normalize)
        caps = torch.round(counts * (1 - self.floor_ratio) + int(base * self.floor_ratio)).long()
        return head_rows(scores, caps.tolist(), self.start_size, self.window_size, n)


def head_rows(scores: torch.Tensor, caps: List[int], start_size: int, window_size: int, n: int) -> List[torch.Tensor]:
    """Per head ``h``: the sinks, the ``caps[h]`` best-scored prefix tokens, the window (``[n_h]``, increasing).

    ``scores`` is ``[kv_heads, n - window_size]``; a cap beyond the prefix keeps the whole prefix.
    """
    return [with_protected(head.topk(min(cap, head.shape[0])).indices[None] + start_size, start_size, window_size, n)[0]
            for head, cap in zip(scores[:, start_size:], caps)]

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

``allocation="kvpress"`` shares the slots out by kvpress's ``AdaKVPress`` rule instead (NVIDIA/kvpress @
8bb29b9, ``kvpress/presses/adakv_press.py``), on our SnapKV scores: see :func:`safeguarded_counts`.
kvpress's AdaKV wraps a scorer press; its ``SnapKVPress`` scores rank as ours with ``pooling="avg"`` and
``kernel_size=5`` (its defaults, with ``window_size=64``; its mean over the window's queries is our sum
over ``window_size``). Other scorers (``ExpectedAttentionPress``, ...) are not reproduced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Literal, Optional

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


def safeguarded_counts(scores: torch.Tensor, budget: int, floor: int) -> torch.Tensor:
    """kvpress's ``AdaKVPress`` allocation: each head's best ``floor`` first, then a flattened top-k of the rest.

    kvpress raises each head's top ``int(n_kept * alpha_safeguard)`` scores to the dtype's maximum and
    prunes the lowest ``kv_heads * (n - n_kept)`` of all heads' scores together: raw scores, no
    normalization, the guaranteed tokens outside the competition.

    Parameters
    ----------
    scores : ``[kv_heads, m]`` prefix scores (the tokens kvpress would not protect).
    budget : prefix slots per head on average (the layer shares ``kv_heads * budget``).
    floor : prefix slots each head keeps whatever the scores, ``0 <= floor <= min(budget, m - 1)``.

    Returns
    -------
    ``LongTensor [kv_heads]``: prefix slots per head, summing to ``kv_heads * budget``.
    """
    heads = scores.shape[0]
    rest = scores.sort(-1, descending=True).values[:, floor:]  # [kvh, m - floor]
    winners = rest.reshape(-1).topk(heads * (budget - floor)).indices // rest.shape[1]
    return floor + torch.bincount(winners, minlength=heads)


@dataclass
class AdaKV(SnapKV):
    """SnapKV's per-head choice with per-head budgets that follow the scores (the layer's total unchanged).

    Parameters
    ----------
    floor_ratio : float
        Share of each head's average budget it keeps whatever the scores (KVCache-Factory's ``floor_ratio``;
        under ``--allocation kvpress`` kvpress's ``alpha_safeguard``, of ``cache_size``, window and sinks included).
    normalize : bool
        Scale each head's scores by the share of its score mass in its own top ``B`` before comparing heads
        (KVCache-Factory's allocation only: kvpress compares raw scores).
    allocation : {"kvcache_factory", "kvpress"}
        How the layer's slots are shared out among its heads: KVCache-Factory's ``AdaKVCluster`` (counts from a
        flattened top-k, then ``round(count (1 - floor_ratio) + int(B floor_ratio))``), or kvpress's
        ``AdaKVPress`` (each head's top ``int(cache_size floor_ratio)`` kept, window and sinks counted among
        them, the rest by a flattened top-k of raw scores). Either on our SnapKV scores; a kvpress
        ``compression_ratio`` r on an n-token prompt is ``--cache_size int(n (1 - r))``.
    """

    name: ClassVar[str] = "adakv"
    merge_refused: ClassVar[str] = "its heads keep different numbers of slots (KVCache-Factory's AdaKV ignores --merge)"
    ragged: ClassVar[bool] = True

    floor_ratio: float = param(0.2, low=0.0, high=1.0)
    normalize: bool = True
    allocation: Literal["kvcache_factory", "kvpress"] = param("kvcache_factory", added_later=True)

    def max_cache_len(self, num_layers: int) -> Optional[int]:
        return None  # one head may keep up to the whole prompt

    def layer_keep(self, layer: int, n: int, budget: int) -> List[torch.Tensor]:
        scores = self._window_scores[layer]  # [kvh, n - w]
        protected = self.start_size + self.window_size
        base = budget - protected
        if self.allocation == "kvpress":
            # kvpress's window scores (max + 1) rank first among a head's boosted top, so sinks and window
            # use up the safeguard before any prefix token does
            floor = max(0, int(budget * self.floor_ratio) - protected)
            caps = safeguarded_counts(scores[:, self.start_size:], base, floor)
        else:
            counts = head_counts(scores[:, self.start_size:], base, self.normalize)
            caps = torch.round(counts * (1 - self.floor_ratio) + int(base * self.floor_ratio)).long()
        return head_rows(scores, caps.tolist(), self.start_size, self.window_size, n)


def head_rows(scores: torch.Tensor, caps: List[int], start_size: int, window_size: int, n: int) -> List[torch.Tensor]:
    """Per head ``h``: the sinks, the ``caps[h]`` best-scored prefix tokens, the window (``[n_h]``, increasing).

    ``scores`` is ``[kv_heads, n - window_size]``; a cap beyond the prefix keeps the whole prefix.
    """
    return [with_protected(head.topk(min(cap, head.shape[0])).indices[None] + start_size, start_size, window_size, n)[0]
            for head, cap in zip(scores[:, start_size:], caps)]

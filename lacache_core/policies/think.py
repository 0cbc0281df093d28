"""ThinK (Xu et al., ICLR 2025, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018):
SnapKV's choice of prompt tokens, then the key channels that matter least to the last queries dropped.

This follows KVCache-Factory's ``SnapKVCluster.update_think`` and ``key_pruner_query_driven``
(``pyramidkv/pyramidkv_utils.py``), as ``run_longbench.py --method think`` runs them. After SnapKV
keeps ``cache_size`` prompt tokens, each head scores its key channels by

    score[c] = mean over the last 32 prompt queries of q[c]**2  *  mean over the kept keys of k[c]**2

(keys and queries rotated), and the ``int(head_dim * pruning_ratio)`` lowest-scored channels are
dropped from the keys of all kept tokens but the newest ``unpruned_window``. Values, the newest keys
and every key generated later keep all channels. :class:`lacache_core.CompressedCache` stores the
older keys with their kept channels only (``kv_bytes`` counts them so) and gives the attention zeros in
the dropped channels, which is the attention the reference computes from its split cache.

Where we differ, and why:

* GQA: the reference repeats keys to every query head before it compresses, so it scores and
  prunes per query head and saves no memory from the grouping. We keep KV heads; a KV head's channel
  score is the mean of its query heads' scores (the same reduction as our SnapKV's).
* A prompt no longer than ``cache_size`` keeps every token and still has its channels pruned (the
  reference's ``update_think`` returns two values there where its caller unpacks four, and fails).
* Which kept keys keep every channel: by default the newest ``unpruned_window`` (by position). The reference
  strips all rows of its cache but the last ``recent_size``, and its rows are in SnapKV's top-k order (the
  kept prefix tokens by descending pooled score, then the window), so where ``recent_size`` exceeds the
  window it keeps whole the lowest-scored kept tokens and strips the highest-scored. We default to the
  newest tokens, the ones ThinK's paper leaves whole (and the same rows wherever the window is at least
  ``unpruned_window``); ``row_order="score"`` follows the reference's order (sinks, with ``start_size``,
  ahead of the scored tokens).
* Under KV quantization (``--quant``, keys after RoPE) the pruning follows ThinK's own KIVI code
  (SalesforceAIResearch/ThinK @ d200577, ``ThinK_kivi/models/llama_kivi_think.py``): the channels are
  chosen once at the prompt, and every key quantized, prompt or generated, keeps only those; the keys in
  the full-precision residual keep all (:meth:`lacache_core.quant.KIVIStore.prune_channels`, called from :meth:`ThinK.after_keep`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Literal, Optional, Union

import torch

from .base import param
from .scoring import ensure_layer
from .snapkv import SnapKV


def score_ordered(kept: torch.Tensor, scores: torch.Tensor, start_size: int, prefix: int) -> torch.Tensor:
    """The kept slots in KVCache-Factory's cache-row order: sinks, then the kept prefix tokens in the order
    ``topk`` of SnapKV's scores returns them (best first; equal scores as ``topk`` puts them, which is how the
    reference gathers its rows and how :meth:`SnapKV.layer_keep` chose them), then the window.

    Parameters
    ----------
    kept : ``LongTensor [kv_heads, m]``, the kept tokens' positions, increasing (slot ``i`` holds ``kept[:, i]``):
        every sink and window token, and as many prefix tokens in every head.
    scores : ``[kv_heads, >= prefix]``, SnapKV's pooled scores of the prompt before the window.
    prefix : int
        Prompt tokens before the window; positions from ``prefix`` on are the window.

    Returns
    -------
    ``LongTensor [kv_heads, m]``: slots (indices into ``kept``'s rows), first to last.
    """
    heads, m = kept.shape
    sinks = int((kept[0] < start_size).sum())
    count = int(((kept[0] >= start_size) & (kept[0] < prefix)).sum())
    ranked = scores[:, start_size:prefix].topk(count, dim=-1).indices + start_size  # the choice's own call
    slots = torch.arange(m, device=kept.device).expand(heads, m)
    return torch.cat([slots[:, :sinks], torch.searchsorted(kept.contiguous(), ranked), slots[:, sinks + count:]], -1)


def pruned_channels(query_energy: torch.Tensor, key_energy: torch.Tensor, count: int) -> torch.Tensor:
    """Channels kept per head after dropping the ``count`` of lowest ``query_energy * key_energy``.

    Parameters
    ----------
    query_energy, key_energy : ``[kv_heads, d]``, mean squared query and key per channel.

    Returns
    -------
    ``LongTensor [kv_heads, d - count]``, increasing.
    """
    dropped = (query_energy * key_energy).topk(count, dim=-1, largest=False).indices
    kept = torch.ones_like(query_energy, dtype=torch.bool).scatter_(-1, dropped, False)
    heads, d = query_energy.shape
    return torch.arange(d, device=kept.device).expand(heads, d)[kept].view(heads, d - count)


@dataclass
class ThinK(SnapKV):
    """SnapKV's token choice plus query-driven pruning of key channels.

    Parameters
    ----------
    pruning_ratio : float
        Share of each head's key channels dropped (``int(head_dim * pruning_ratio)`` of them;
        KVCache-Factory's ``--pruning_ratio``, 0.4).
    unpruned_window : int
        Newest kept tokens whose keys keep every channel (KVCache-Factory's ``--recent_size``, 32). Under
        ``--quant``, keys keep every channel while in the full-precision residual instead (ThinK's KIVI code).
    row_order : {"position", "score"}
        Order of the kept tokens whose last ``unpruned_window`` keep every channel: ``position`` (the newest);
        ``score``, KVCache-Factory's ``update_think`` (its cache rows: SnapKV's choice by descending pooled
        score, then the window), which keeps the lowest-scored kept tokens whole where ``unpruned_window``
        exceeds ``window_size``. Refused under ``--quant`` (the residual decides there).
    """

    name: ClassVar[str] = "think"
    merge_refused: ClassVar[str] = "it prunes the channels of the keys it keeps (KVCache-Factory's ThinK fails with --merge)"
    #: the cache keeps ThinK's layers in stores of their own (:meth:`after_keep`)
    prunes_channels: ClassVar[bool] = True
    quant_ignores: ClassVar[Dict[str, str]] = {
        "unpruned_window": "ThinK's keys keep every channel while they are in the full-precision residual "
                           "(KIVI.residual), as in ThinK's KIVI code"}
    #: Prompt queries whose energy scores the channels (fixed at 32 in the reference, whatever the window).
    channel_queries: ClassVar[int] = 32

    pruning_ratio: float = param(0.4, low=0.0, below=1.0)
    unpruned_window: int = param(32, low=0)
    row_order: Literal["position", "score"] = param("position", added_later=True)

    _query_energy: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    _whole_rows: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def _reset_state(self) -> None:
        super()._reset_state()
        self._query_energy, self._whole_rows = [], []

    def keep(self, layer: int, n: int):
        scores = None if self._done or layer >= len(self._window_scores) else self._window_scores[layer]
        row = super().keep(layer, n)  # SnapKV's choice drops the scores
        if self.row_order == "score" and scores is not None:
            ensure_layer(self._whole_rows, layer)
            kept = torch.arange(n, device=scores.device).expand(scores.shape[0], n) if row is None else row
            self._whole_rows[layer] = score_ordered(kept, scores, self.start_size, n - self.window_size)[
                :, max(kept.shape[1] - self.unpruned_window, 0):]
        return row

    def unpruned(self, layer: int) -> Union[int, torch.Tensor]:
        """The kept slots whose keys keep every channel (after :meth:`channel_keep`): the newest
        ``unpruned_window``, or under ``row_order="score"`` each head's ``LongTensor [kv_heads, w]``."""
        if layer >= len(self._whole_rows) or self._whole_rows[layer] is None:
            return self.unpruned_window
        whole, self._whole_rows[layer] = self._whole_rows[layer], None
        return whole

    def observe(self, layer, query, key, scaling):
        done = self._done
        super().observe(layer, query, key, scaling)
        ensure_layer(self._query_energy, layer)
        if not done:
            b, heads, _, d = query.shape
            energy = query[:, :, -self.channel_queries:].float().pow(2).mean(2)  # [b, heads, d]
            self._query_energy[layer] = energy.view(b, key.shape[1], heads // key.shape[1], d).mean((0, 2))

    def after_keep(self, layer, store):
        """After the token choice, once per prompt: the layer's older keys keep only :meth:`channel_keep`'s
        channels, the slots :meth:`unpruned` names whole."""
        if not store.prunable:
            return store
        channels = self.channel_keep(layer, store.view()[0])
        return store if channels is None else store.prune_channels(channels, self.unpruned(layer))

    def channel_keep(self, layer: int, key: torch.Tensor) -> Optional[torch.Tensor]:
        """Key channels ``layer`` keeps of its older slots: ``LongTensor [kv_heads, d_keep]`` (increasing), or
        ``None`` to keep every channel. ``key``: ``[b, kv_heads, n, d]``, the kept keys, rotated."""
        if layer >= len(self._query_energy) or self._query_energy[layer] is None:
            return None
        query_energy, self._query_energy[layer] = self._query_energy[layer], None
        count = int(key.shape[-1] * self.pruning_ratio)
        if count == 0:
            return None
        return pruned_channels(query_energy, key.float().pow(2).mean((0, 2)), count)

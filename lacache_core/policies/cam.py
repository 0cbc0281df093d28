"""CaM (Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024).

Sinks plus a window of recent tokens, as StreamingLLM keeps, but a token leaving the window is not simply
dropped: with a probability set by the attention it received, its value is added, divided by the merge
budget, to the values of the tokens that follow it. Keys are never changed.

Written from the behaviour of these reference files (no code taken from them):

* ``zyxxmu/cam`` @ ``fc80e64f460b343be96c87596f2494fc9d319c45``,
  ``generate_task/streaming_llm/kv_cache_cam.py`` (``StartRecentKVCache_cam`` and ``slicev``): the rule
  implemented here. After each step's attention, the attention every head gave each cached token is added to
  a running sum; when the cache exceeds ``start + recent`` slots, the token just before the window (slot
  ``s - 1``, with ``s = n - recent``) is evicted and, per head,
  ``p = acc[s - 1] / mean(acc[s : s + M])`` (NaN read as 0, clipped to [0, 1]),
  ``mask ~ Bernoulli(p)``, and ``v[s : s + M] += mask * v[s - 1] / M`` with ``M = 16``; keys stay as they
  are and sit at their cache slots (position shift).
* ``zyxxmu/cam`` @ the same commit, ``cam_hf/utils_hh/modify_llama_cam.py`` (``local_cam_mask``), the
  masked-attention simulation behind the paper's tables: the same merge with ``M = 32``, ``p`` from the
  current step's attention only, over the mean of the window's tokens after it, and applied to the window's
  second-oldest token rather than the one just masked out (the mask leaves every value in place).
* ``Zefan-Cai/KVCache-Factory`` @ ``c97f9d706d63d1b56e980f8b81b2a924c21162b3``,
  ``pyramidkv/pyramidkv_utils.py`` (``CAMKVCluster``): a prefill-time variant. It replays the merge over the
  prompt token by token (``p`` from the mean attention of the prompt's first queries, divided by the *max*
  over sinks and window, ``M`` = the observation window), then keeps SnapKV's top-k of the window's attention
  rather than sinks plus recent tokens.

Where we differ, and why:

* Several tokens leaving at once (a prompt longer than the budget, a chunked prefill) are merged one after
  another, oldest first, each into the ``M`` tokens after it, as one decode step per evicted token would do
  (and as KVCache-Factory replays a prompt); a value merged into a token that is itself evicted later in the
  same pass is carried on with it. The reference merges only the newest of them and drops the rest. Their
  probabilities all come from the scores as they stand at that pass, and the merge is a loop of one small
  update per evicted token (a chunked prefill bounds it). At one eviction per step (decoding) this is the
  reference rule exactly.
* Scores are summed over every query since a token entered the cache, the prompt's included (the reference
  adds each call's attention rows, written for one query per call). With grouped-query attention the query
  heads of a KV head are averaged (the reference code is for multi-head attention; KVCache-Factory's default
  group reduction is the mean).
* The Bernoulli draws come from :func:`scoring.seeded_generator` (seed, layer, tokens seen), one uniform per
  evicted token and KV head, merged where it falls below ``p``: the reference's distribution, reproducible
  with no random state to save. ``merge_mode="expected"`` merges ``p`` times the value instead (the mean of
  the draw), a deterministic variant of our own.
* In a batch each row's policy merges its own row's values (over its own slots, after any left padding).
* Under ``--quant`` (ours; the reference has no quantization) the merge reads the dequantized values, and a
  quantized token whose value a merge changed is held whole from then on, over its codes, until it is evicted
  (:meth:`lacache_core.storage.LayerStore.rewrite_values`): a token receives up to ``merge_budget`` merges, and
  quantizing it again after each would add up the rounding. The tokens held so are at most the
  ``merge_budget`` oldest of the window, per head; their bytes are counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Literal, Optional

import torch

from .base import CachePolicy, param
from .scoring import attention_probs, ensure_layer, seeded_generator


def head_attention_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, chunk: int = 256) -> torch.Tensor:
    """Attention each key received from all queries, per KV head (query heads of a group and batch averaged).

    Parameters
    ----------
    query : ``[b, heads, q, d]``; key : ``[b, kv_heads, n, d]``, ``n >= q`` (causal).

    Returns
    -------
    ``[kv_heads, n]`` float32.
    """
    q, n = query.shape[2], key.shape[2]
    total = torch.zeros(key.shape[1], n, device=key.device, dtype=torch.float32)
    for start in range(0, q, chunk):
        stop = min(start + chunk, q)
        visible = n - q + stop  # keys after the chunk's last query are masked for all of the chunk
        total[:, :visible] += attention_probs(query[:, :, start:stop], key[:, :, :visible], scaling).sum(2).mean(0)
    return total


@dataclass
class CAM(CachePolicy):
    """Keep sinks and recent tokens; merge each evicted token's value into the next ones' values.

    Parameters
    ----------
    cache_size : int
        Slots per layer ``C``: ``start_size`` sinks and ``C - start_size`` recent tokens.
    start_size : int
        Leading tokens always kept (attention sinks).
    merge_budget : int
        Tokens ``M`` an evicted token's value is merged into (those right after it); the value is divided
        by ``M`` (the reference's streaming code: 16).
    merge_mode : {"sample", "expected"}
        ``sample``: merge with probability ``p`` (a seeded Bernoulli draw per evicted token and KV head, as the
        reference); ``expected``: always merge, scaled by ``p`` (deterministic).
    random_seed : int
        Seed of the sampling: the draws depend on it, the layer and the tokens seen, nothing else.

    With scores ``acc`` (attention received, summed over queries, ``[kv_heads, n]``) and an evicted slot
    ``j`` whose targets are ``j + 1 .. j + M`` (those that exist), ``p = acc[j] / mean(acc[targets])``
    (NaN: 0; clipped to [0, 1]) and each target's value ``[b, kv_heads, d]`` gains ``mask * v[j] / M``.
    """

    name: ClassVar[str] = "cam"
    default_positions: ClassVar[str] = "slot"
    observes: ClassVar[bool] = True

    cache_size: int = param(256, low=lambda p: p.start_size + 1)
    start_size: int = param(4, low=0)
    merge_budget: int = param(16, low=1)
    merge_mode: Literal["sample", "expected"] = "sample"
    random_seed: int = param(0, low=0)

    _scores: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)
    #: Per layer, between :meth:`keep` and :meth:`merge_values`: ``[E, kv_heads]`` merge probabilities of the
    #: ``E`` slots evicted (``start_size .. start_size + E - 1``), float64.
    _merge_prob: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def _reset_state(self) -> None:
        self._scores, self._merge_prob = [], []

    @property
    def recent_size(self) -> int:
        return self.cache_size - self.start_size

    def max_cache_len(self, num_layers: int) -> int:
        return self.cache_size

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._scores, layer)
        mass = head_attention_mass(query, key, scaling)
        old = self._scores[layer]
        if old is not None:
            mass[:, :old.shape[1]] += old
        self._scores[layer] = mass

    def merge_probabilities(self, scores: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """``[stop - first, kv_heads]``: for each evicted slot ``j`` in ``first .. stop - 1``,
        ``acc[j] / mean(acc[j + 1 .. j + M])`` over the targets that exist, NaN as 0, clipped to [0, 1].

        ``scores`` is ``[kv_heads, n]``.
        """
        acc = scores.double()
        n = acc.shape[1]
        sums = torch.nn.functional.pad(acc.cumsum(1), (1, 0))  # sums[:, i] = acc[:, :i].sum()
        j = torch.arange(first, stop, device=acc.device)
        end = (j + 1 + self.merge_budget).clamp_max(n)
        mean = (sums[:, end] - sums[:, j + 1]) / (end - j - 1)
        prob = acc[:, j] / mean
        return prob.nan_to_num(nan=0.0).clamp(0.0, 1.0).T

    def keep(self, layer: int, n: int):
        ensure_layer(self._merge_prob, layer)
        self._merge_prob[layer] = None
        if n <= self.cache_size:
            return None
        scores = self._scores[layer] if layer < len(self._scores) else None
        if scores is None or scores.shape[1] != n:
            raise RuntimeError(f"{self.name} merges by the attention it observed: run it in a CompressedCache")
        s, stop = self.start_size, n - self.recent_size
        self._merge_prob[layer] = self.merge_probabilities(scores, s, stop)
        row = torch.cat([torch.arange(s, device=scores.device), torch.arange(stop, n, device=scores.device)])
        self._scores[layer] = scores[:, row]
        return row

    def before_keep(self, layer, keep, store, value):
        """The evicted slots' values merged into the slots after them (:meth:`merge_values`), written into
        ``store`` before ``keep`` applies."""
        if keep is not None:
            merged = self.merge_values(layer, keep, value)
            store.rewrite_values(merged, (merged != value).any(-1))

    def merge_values(self, layer: int, keep: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Values of layer ``layer`` with this step's evicted tokens merged into their targets, before ``keep``
        is gathered from them.

        Parameters
        ----------
        keep : the cache's index for this step (unused: the evicted slots are those :meth:`keep` just left out,
            ``start_size .. n - recent_size - 1``, whose probabilities it stored).
        value : ``[b, kv_heads, n, d]``, every slot of this policy's row(s); this step's attention has used it,
            so it is not changed.

        Returns
        -------
        ``[b, kv_heads, n, d]``: a new tensor, the evicted slots' values merged (in order) into the slots after.
        """
        prob = self._merge_prob[layer] if layer < len(self._merge_prob) else None
        if prob is None:
            return value
        self._merge_prob[layer] = None
        if self.merge_mode == "sample":
            draws = torch.rand(prob.shape, generator=seeded_generator(self.random_seed, layer, self.seen),
                               dtype=torch.float64)
            weight = (draws.to(prob.device) < prob).to(prob.dtype)
        else:
            weight = prob
        weight = (weight / self.merge_budget).to(device=value.device, dtype=value.dtype)  # [E, kv_heads]
        merged = value.clone()
        for i in range(weight.shape[0]):  # oldest first: a merged value travels on with a later eviction
            j = self.start_size + i
            merged[:, :, j + 1:j + 1 + self.merge_budget] += (merged[:, :, j] * weight[i][None, :, None])[:, :, None]
        return merged

"""MiniCache (Liu et al., NeurIPS 2024, "MiniCache: KV Cache Compression in Depth Dimension for Large Language
Models", arXiv 2405.14366): adjacent layers from the middle of the model on share one merged KV cache.

No token is evicted. At the end of the prompt's forward pass, layers ``(s, s + 1), (s + 2, s + 3), ...``
(``s = merge_start``, by default the middle layer ``num_layers // 2``) are merged pair by pair. Per token and
KV head, with ``x`` the earlier layer's vector and ``y`` the later one's, ``u = x / |x|``, ``w = y / |y|`` and
``theta = arccos(u . w)``, the pair keeps

* one direction for both layers, the SLERP ``sin((1 - t) theta) / sin(theta) * u + sin(t theta) / sin(theta) * w``
  (``t = interpolation``; re-normalised), at angle ``t * theta`` from ``u``;
* each layer's own magnitude ``|x|`` and ``|y|``;
* the ``ceil(n * retention_ratio)`` tokens of the largest angle between the two layers' keys, unmerged, exactly,
  for both layers (keys and values; the values reuse the keys' choice).

Keys and values are merged separately. A layer is restored as the shared direction times its magnitudes, its
retained tokens put back (:class:`lacache_core.merged_store.MergedPair`); tokens generated later are each layer's own,
stored whole. :class:`lacache_core.CompressedCache` holds the pair once for both layers, so ``kv_bytes`` counts
what it really stores.

This follows KVCache-Factory's ``pyramidkv/minicache.py`` (``minicache_slerp``,
``select_minicache_retention_indices``, ``compress_minicache_pair``, ``restore_minicache_pair``; tests in
``tests/core/test_minicache.py``) at commit c97f9d7, and its runtime pair-store contract (``docs/algorithm_backlog.md``:
retention chosen from the keys' angular distance, values retained at the same positions). The authors'
repository (AkideLiu/MiniCache) holds no code.

Where we differ, and why:

* The reference is a pair of functions with no model around them; we merge once, after the prompt's forward pass
  (the prompt itself attends to the unmerged cache), and keep the tokens generated later per layer, unmerged.
* Retention is chosen from the keys' angles and the values follow it (the reference's runtime contract); calling
  the reference's ``compress_minicache_pair`` on values alone would choose from the values' own angles.
* Each KV head is merged on its own (GQA: keys and values as stored, never repeated to the query heads).
* Keys are merged as stored: rotated at their original positions (the default) or un-rotated
  (``--key_rotation every_step``). RoPE rotates both layers' keys of a token by the same orthogonal map, which
  leaves norms and angles alone and commutes with the SLERP, so both give the same keys up to rounding.
* Magnitudes are stored as they are (the reference stores them clamped to at least ``1e-6``, so a zero vector comes
  back as a tiny one; here it comes back as zero). Directions and angles are computed in float32 and the
  direction stored in the cache's dtype.
* In a left-padded batch each row merges its own tokens (pad slots take no retention slot).
* Under ``--quant`` a pair's earlier layer stays whole until the later one merges with it, the two shared
  directions are quantized once, and magnitudes and retained tokens stay whole (:func:`merge_layers`). This is
  ours: the paper reports "4-bit MiniCache" (up to 5.02x on ShareGPT with LLaMA-2-7B) but publishes no code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, List, Optional, Tuple

import torch

from ..errors import ConfigError
from ..merged_store import MergedLayerStore, MergedPair
from ..storage import DenseStore, LayerStore, RowStores
from .base import CachePolicy, param

if TYPE_CHECKING:  # annotations only: the quantizers' stores never import a policy
    from ..quantizers import Quantizer

EPS = 1e-6


def slerp_directions(previous: torch.Tensor, current: torch.Tensor, interpolation: float):
    """The direction two layers' vectors share, their magnitudes and the angle between them.

    Parameters
    ----------
    previous, current : ``[b, kv_heads, n, d]``, the earlier and the later layer's keys (or values).
    interpolation : ``t``: 0 gives the earlier layer's direction, 1 the later one's.

    Returns
    -------
    ``(direction, previous_norm, current_norm, angle)``: ``direction`` ``[b, kv_heads, n, d]`` (unit, float32),
    the norms ``[b, kv_heads, n]`` (float32) and ``angle`` ``[b, kv_heads, n]`` in ``[0, pi]``.
    """
    x, y = previous.float(), current.float()
    x_norm, y_norm = x.norm(dim=-1), y.norm(dim=-1)
    u, w = x / x_norm.clamp_min(EPS)[..., None], y / y_norm.clamp_min(EPS)[..., None]
    cosine = (u * w).sum(-1).clamp(-1.0 + EPS, 1.0 - EPS)
    angle = torch.acos(cosine)
    sine = torch.sin(angle)[..., None]
    theta = angle[..., None]
    spherical = (torch.sin((1.0 - interpolation) * theta) * u + torch.sin(interpolation * theta) * w) / sine
    linear = (1.0 - interpolation) * u + interpolation * w  # where the angle is too small for the SLERP's division
    direction = torch.where(sine.abs() > EPS, spherical, linear)
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(EPS), x_norm, y_norm, angle


def retained_slots(angle: torch.Tensor, retention_ratio: float) -> torch.Tensor:
    """The ``ceil(n * retention_ratio)`` slots of largest ``angle`` (``[b, kv_heads, n]``) per row and head.

    Returns
    -------
    ``LongTensor [b, kv_heads, r]``, increasing along the last dimension.
    """
    count = min(angle.shape[-1], math.ceil(angle.shape[-1] * retention_ratio))
    return torch.topk(angle, count, dim=-1).indices.sort(dim=-1).values


def merge_layers(previous: Tuple[torch.Tensor, torch.Tensor], current: Tuple[torch.Tensor, torch.Tensor],
                 interpolation: float, retention_ratio: float, quant: Optional[Quantizer] = None) -> MergedPair:
    """Merge two adjacent layers' ``(key, value)`` (each ``[b, kv_heads, n, d]``) into one :class:`MergedPair`.

    Keys and values each get their own shared direction; the retained slots are those of the largest angle
    between the two layers' keys, and the values are retained at the same slots. Under ``quant`` the directions
    are quantized at once (every whole block; no residual: the newest tokens in full precision are each
    layer's own, appended later, each layer's tail a store of ``quant``); magnitudes and retained tokens stay whole.
    """
    (k0, v0), (k1, v1) = previous, current
    key_direction, key_norm0, key_norm1, key_angle = slerp_directions(k0, k1, interpolation)
    value_direction, value_norm0, value_norm1, _ = slerp_directions(v0, v1, interpolation)
    index = retained_slots(key_angle, retention_ratio)  # [b, kv_heads, r]
    full = index[..., None].expand(*index.shape, k0.shape[-1])
    directions = (key_direction.to(k0.dtype), value_direction.to(v0.dtype))
    if quant is None:
        held, tail_store = DenseStore(*directions), None
    else:
        held = replace(quant, residual=0).new_store(*directions)
        held.compress()
        tail_store = quant.new_store
    return MergedPair(held, (key_norm0.to(k0.dtype), key_norm1.to(k1.dtype)),
                      (value_norm0.to(v0.dtype), value_norm1.to(v1.dtype)), index,
                      (k0.gather(2, full), k1.gather(2, full)), (v0.gather(2, full), v1.gather(2, full)), tail_store)


@dataclass
class MiniCache(CachePolicy):
    """Keep every token; after the prompt, merge adjacent layers from ``merge_start`` on into one shared KV.

    Parameters
    ----------
    interpolation : float
        SLERP parameter `t` of the shared direction: 0 is the earlier layer's, 1 the later one's (the paper's 0.6).
    retention_ratio : float
        Share of the prompt's tokens, those whose keys differ most in angle between the two layers, kept
        unmerged in both (keys and values; `ceil(n * retention_ratio)` of them; the paper's 0.05).
    merge_start : int, optional
        First merged layer: layers `(s, s + 1), (s + 2, s + 3), ...` share a cache; a last layer left alone stays
        whole. Default: the middle layer, `num_layers // 2`.
    """

    name: ClassVar[str] = "minicache"
    prefill_only: ClassVar[bool] = True

    interpolation: float = param(0.6, low=0.0, high=1.0)
    retention_ratio: float = param(0.05, low=0.0, high=1.0)
    merge_start: Optional[int] = param(None, low=0)

    _merged: List[int] = field(default_factory=list, init=False, repr=False)  # the later layers of merged pairs

    def _reset_state(self) -> None:
        self._merged = []

    def first_merged(self, num_layers: int) -> int:
        """The first merged layer (``merge_start``, or ``num_layers // 2``)."""
        return num_layers // 2 if self.merge_start is None else self.merge_start

    def validate(self, num_layers: int) -> None:
        start = self.first_merged(num_layers)
        if num_layers < 2:
            raise ConfigError(f"make_cache.method {self.name} merges pairs of layers: a {num_layers}-layer model has none")
        if start > num_layers - 2:
            raise ConfigError(f"MiniCache.merge_start {start} leaves no pair of layers to merge in a {num_layers}-layer model; "
                              f"it must be in [0, {num_layers - 2}]")

    def merged_pairs(self, num_layers: int) -> List[Tuple[int, int]]:
        """The layers merged together: ``[(s, s + 1), (s + 2, s + 3), ...]``."""
        return [(i, i + 1) for i in range(self.first_merged(num_layers), num_layers - 1, 2)]

    def closes_pair(self, layer: int) -> bool:
        """Whether ``layer`` is the later layer of a merged pair."""
        start = self.first_merged(self._num_layers)
        return start < layer < self._num_layers and (layer - start) % 2 == 1

    def select(self, n: int, num_layers: int) -> Optional[torch.Tensor]:
        return None  # no token is evicted

    def layer_budgets(self, num_layers: int, prompt_len: Optional[int] = None) -> List[Optional[int]]:
        """Slots each layer holds after a prompt of ``prompt_len`` tokens: all of them (``None``: unbounded)."""
        return [prompt_len] * num_layers

    def merge_pair(self, previous: Tuple[torch.Tensor, torch.Tensor], current: Tuple[torch.Tensor, torch.Tensor],
                   fillers: Optional[torch.Tensor] = None, quant: Optional[Quantizer] = None) -> Tuple[LayerStore, LayerStore]:
        """The stores of a pair's two layers after the merge (the earlier layer's first).

        Parameters
        ----------
        previous, current : ``(key, value)`` of the earlier and the later layer, each ``[b, kv_heads, n, d]``
            (keys as stored: rotated or not).
        fillers : ``LongTensor [b]``, optional
            Slots at the front of each row that hold none of its tokens (a left-padded batch): each row then
            merges its own tokens in a store of its own (:class:`lacache_core.storage.RowStores`), every row with
            this policy's settings.
        quant : the cache's quantization (:class:`lacache_core.quantizers.Quantizer`), if any: see :func:`merge_layers`.
        """
        if fillers is None:
            pair = merge_layers(previous, current, self.interpolation, self.retention_ratio, quant)
            return MergedLayerStore(pair, 0), MergedLayerStore(pair, 1)
        pairs = [merge_layers(*(tuple(t[j:j + 1, :, f:] for t in kv) for kv in (previous, current)),
                              self.interpolation, self.retention_ratio, quant) for j, f in enumerate(fillers.tolist())]
        return RowStores([MergedLayerStore(p, 0) for p in pairs]), RowStores([MergedLayerStore(p, 1) for p in pairs])

    def merged_stores(self, layer, previous, current, fillers=None, quant=None):
        """At a pair's later layer, in the prompt's pass (both layers still whole): :meth:`merge_pair`'s stores."""
        if not self.closes_pair(layer) or layer in self._merged:
            return None
        self._merged.append(layer)
        return self.merge_pair(previous(), current, fillers, quant)

    def holds_whole(self, layer):
        """A pair's earlier layer, until the later one merges with it."""
        return layer + 1 < self._num_layers and self.closes_pair(layer + 1) and layer + 1 not in self._merged

    def __call__(self, past_key_values):
        raise ConfigError(f"make_cache.method {self.name} stores merged layer pairs in a form of its own: run it with a "
                          "lacache_core.CompressedCache, not on (key, value) lists")

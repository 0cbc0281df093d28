"""Common machinery of every cache policy.

A policy decides, after each forward pass, which cache slots every layer keeps. It never touches
tensors itself: :meth:`CachePolicy.compact` returns one index row per layer, and the caller (the
official-style ``policy(past_key_values)`` call, or :class:`lacache_core.cache.CompressedCache`)
gathers keys and values with it. Keeping the policy tensor-free makes it testable on positions
alone and lets every cache container share the same gather code.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError

KVList = Sequence[Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CachePolicy:
    """Base class: tracks which original token positions each layer holds.

    Subclasses implement :meth:`select`. Everything about bookkeeping (new tokens appended since
    the last call, original positions, index caching per device) lives here.
    """

    name: ClassVar[str] = "base"
    #: ``True`` for policies whose cache slots are re-rotated (keys cached before RoPE).
    position_shift: ClassVar[bool] = True
    #: ``True`` for policies that score tokens: :meth:`observe` then sees every layer's queries and keys.
    observes: ClassVar[bool] = False
    #: ``True`` for policies that compress once, after the first forward pass (the prompt), and never again.
    prefill_only: ClassVar[bool] = False

    _positions: Optional[torch.Tensor] = field(default=None, init=False, repr=False)
    _num_layers: Optional[int] = field(default=None, init=False, repr=False)
    _seen: int = field(default=0, init=False, repr=False)

    # ----------------------------------------------------------------- hooks for subclasses
    def validate(self, num_layers: int) -> None:
        """Raise :class:`ConfigError` if the settings cannot work with ``num_layers`` layers."""

    def select(self, n: int, num_layers: int) -> Optional[torch.Tensor]:
        """Slots to keep, given ``n`` cached slots in every layer.

        Returns
        -------
        torch.LongTensor of shape ``[num_layers, n_keep]`` (increasing per row; any device), or
        ``None`` when nothing is evicted.
        """
        raise NotImplementedError

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """See one layer's attention inputs of the current forward pass (before compaction).

        Parameters
        ----------
        query : ``[batch, heads, q, head_dim]``, rotated as the attention sees it.
        key : ``[batch, kv_heads, n, head_dim]``, all cached keys including the new ones, rotated.
        scaling : the attention's softmax scale (``head_dim ** -0.5``).
        """

    def max_cache_len(self, num_layers: int) -> Optional[int]:
        """Largest number of slots a layer holds after a call (``None``: unbounded)."""
        return None

    # ----------------------------------------------------------------- shared machinery
    @classmethod
    def hyperparameters(cls) -> List[str]:
        return [f.name for f in fields(cls) if f.init]

    def settings(self) -> dict:
        """The hyper-parameters, as a JSON-friendly dict (for run records)."""
        return {"method": self.name, **{k: getattr(self, k) for k in self.hyperparameters()}}

    def reset(self) -> None:
        """Forget all state (start a new sequence)."""
        self._positions, self._num_layers, self._seen = None, None, 0
        self._reset_state()

    def _reset_state(self) -> None:
        """Subclasses reset their own running state here."""

    def bind(self, num_layers: int) -> None:
        if self._num_layers is None:
            self.validate(num_layers)
            self._num_layers = num_layers
        elif self._num_layers != num_layers:
            raise ConfigError(
                f"cache policy was used with {self._num_layers} layers, now {num_layers}; call reset() between models"
            )

    @property
    def positions(self) -> Optional[torch.Tensor]:
        """Original token position held in each slot, ``LongTensor [num_layers, n]`` (or ``None``)."""
        return self._positions

    def positions_per_layer(self) -> List[List[int]]:
        """Per layer, the original token positions held (for tests and plots)."""
        return [] if self._positions is None else self._positions.tolist()

    def compact(self, n: int, num_layers: int) -> Optional[torch.Tensor]:
        """Record that every layer now holds ``n`` slots and return the slots to keep (or ``None``)."""
        self.bind(num_layers)
        self._observe(n, num_layers)
        keep = self.select(n, num_layers)
        if keep is not None:
            self._positions = torch.gather(self._positions, 1, keep.to(self._positions.device))
        return keep

    def _observe(self, n: int, num_layers: int) -> None:
        held = 0 if self._positions is None else self._positions.shape[1]
        new = n - held
        if new < 0:
            raise RuntimeError(
                f"the cache shrank from {held} to {n} slots outside the policy; use a fresh cache per sequence"
            )
        fresh = torch.arange(self._seen, self._seen + new).expand(num_layers, new)
        self._positions = fresh.clone() if self._positions is None else torch.cat([self._positions, fresh], 1)
        self._seen += new

    def __call__(self, past_key_values: KVList) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Official-repository API: compact a list of ``(key, value)`` pairs.

        Parameters
        ----------
        past_key_values : sequence of ``(key, value)``, each ``[batch, kv_heads, seq, head_dim]``
            One pair per layer, all with the same ``seq``.

        Returns
        -------
        list of ``(key, value)`` pairs, compacted (the input is returned unchanged if nothing is evicted).
        """
        if past_key_values is None:
            return past_key_values
        pkv = [tuple(layer) for layer in past_key_values]
        n = pkv[0][0].shape[-2]
        keep = self.compact(n, len(pkv))
        if keep is None:
            return pkv
        return [gather_layer(k, v, row) for (k, v), row in zip(pkv, keep)]


def gather_layer(key: torch.Tensor, value: torch.Tensor, keep_row: torch.Tensor):
    """Keep slots ``keep_row`` of one layer's ``[b, h, seq, d]`` key and value.

    ``keep_row`` is ``LongTensor [n_keep]`` (the same slots for every head) or ``[h, n_keep]``
    (per KV head, as SnapKV and PyramidKV select).
    """
    idx = keep_row if keep_row.device == key.device else keep_row.to(key.device)
    if idx.dim() == 1:
        return key.index_select(-2, idx), value.index_select(-2, idx)
    b, h, _, d = key.shape
    full = idx[None, :, :, None].expand(b, h, idx.shape[-1], d)
    return key.gather(2, full), value.gather(2, full)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_int(flag: str, value, low: int, high: Optional[int] = None) -> None:
    """Raise a one-line :class:`ConfigError` unless ``low <= value (<= high)``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"--{flag} must be an integer in {rng}, got {value!r}")

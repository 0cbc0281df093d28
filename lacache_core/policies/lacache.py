"""LaCache: ladder-shaped KV cache with iterative compaction (Shi et al., ICML 2025).

Reproduces the slot selection of the official implementation (GATECH-EIC/LaCache @ 0f27c33) as
specified in ``LACACHE_SPEC.md``: same kept positions in every layer after every call, for every
configuration the official code handles correctly. Where the official code is defective we
deviate, as documented in docs/reference_differences.md ("LaCache: where we differ from the official code"):

* settings that divide by zero or corrupt the cache are rejected up front (:class:`ConfigError`);
* a startover that merges two or more groups at once (``times >= 2``) made some layers keep one
  token twice; those layers now take the last offset that stays inside the group;
* a startover whose kept slots would lie past the end of the cache (the official code's
  ``IndexError``, after a long prompt into a small cache) runs in *rounds* instead: each round is
  the official startover for the largest number of slots it can free with all its groups before
  the newest slot, and rounds repeat until the cache is within budget (:meth:`LaCache.startover_rounds`).

The index arithmetic is vectorised: one ``[num_layers, n_keep]`` index per call, built from a
handful of ``arange`` ops, never Python lists per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch

from ..errors import ConfigError
from .base import CachePolicy, ceil_div, param


def ladder_index(n: int, start: int, groups: int, group_size: int, inner: torch.Tensor,
                 layer_offset: torch.Tensor) -> torch.Tensor:
    """Slots kept by a ladder pass over ``n`` slots.

    Every layer keeps the slots before ``start`` and from ``start + group_size * groups`` on; in
    group ``j`` it keeps ``start + group_size * j + layer_offset[layer] + inner``.

    Parameters
    ----------
    inner : LongTensor ``[A]``, offsets inside a group relative to the layer's offset.
    layer_offset : LongTensor ``[L]``.

    Returns
    -------
    LongTensor ``[L, start + groups * A + (n - start - group_size * groups)]``.
    """
    num_layers = layer_offset.shape[0]
    head = torch.arange(start).expand(num_layers, start)
    in_groups = (torch.arange(groups) * group_size)[:, None] + inner[None, :]  # [groups, A]
    body = start + layer_offset[:, None] + in_groups.reshape(1, -1)
    # After a very long prefill the last group can run past the end (the official code's slice is
    # then empty): no tail.
    tail_from = min(start + group_size * groups, n)
    tail = torch.arange(tail_from, n).expand(num_layers, n - tail_from)
    return torch.cat([head, body, tail], dim=1)


def merged_group(group: int, times: int) -> int:
    """Width ``B2`` of a startover group that merges ``times`` ladder groups of ``group`` slots (they share ends)."""
    return group + (times - 1) * (group - 1)


@dataclass
class LaCache(CachePolicy):
    """Ladder-shaped KV cache with iterative compaction.

    Parameters
    ----------
    cache_size : int
        Requested cache length ``C`` (slots per layer). With ``compensate=True`` (official), the
        length saw-tooths up to ``C + floor(R / 2)`` so that its average is about ``C``.
    span : int
        ``S``, ladder span (official meaning; see docs/reference_differences.md for the paper-prose layout).
    overlap : int
        ``O``, ladder overlap, ``0 <= O < S``.
    start_size : int
        ``s``, leading tokens (attention sinks) never evicted.
    compensate : bool
        Grow ``C`` once by ``floor(R / 2)`` at the first compaction, as the official code does.
    ladder_layout : {"official", "paper"}
        Which layer keeps which slot of a ladder group. ``official``: layer ``i`` starts at offset
        ``i mod (R + 1)`` (layers alternate). ``paper``: the layout of the paper's prose: token ``j``
        of a group is kept by the ``S`` consecutive layers ``[j (S - O), j (S - O) + S - 1]``
        (shallow layers old tokens, deep layers new), widened at the first and last token so that
        every layer keeps ``A`` slots per group.
    num_layers : int, optional
        If given, the settings are validated against it immediately.

    Notes
    -----
    Startover in rounds: where the official startover would read past the end of the cache (its
    ``IndexError`` after a long prompt into a small cache), the startover runs in rounds, each the
    official startover for the most slots it can free with every group before the newest slot,
    until the cache is within budget (:meth:`startover_rounds`). Everywhere else the kept
    positions are the official ones.

    Examples
    --------
    >>> cache = LaCache(cache_size=256, span=16, overlap=0, start_size=4)
    >>> past_key_values = cache(past_key_values)  # list of (key, value), [b, h, seq, d]
    """

    name: ClassVar[str] = "lacache"
    default_positions: ClassVar[str] = "slot"

    cache_size: int = param(256, low=1)
    span: int = param(16, low=1, short="S")
    overlap: int = param(0, low=0, high=lambda p: p.span - 1, short="O")
    start_size: int = param(4, low=0)
    compensate: bool = True
    ladder_layout: Literal["official", "paper"] = "official"
    num_layers: Optional[int] = param(None, low=1, flag=False)

    _capacity: int = field(default=0, init=False, repr=False)
    _cursor: int = field(default=0, init=False, repr=False)
    _compensated: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._reset_state()
        if self.num_layers is not None:
            self.validate(self.num_layers)

    def _reset_state(self) -> None:
        self._capacity = self.cache_size
        self._cursor = self.start_size
        self._compensated = False

    # ------------------------------------------------------------------ ladder geometry
    def geometry(self, num_layers: int):
        """``(B, A, R)``: slots per ladder group, slots each layer keeps per group, slots freed per group."""
        step = self.span - self.overlap
        group = 1 + ceil_div(num_layers - self.span, step)
        kept = min(ceil_div(self.span, step), group)
        return group, kept, group - kept

    def min_cache_size(self, num_layers: int) -> int:
        _, kept, _ = self.geometry(num_layers)
        return self.start_size + num_layers + kept

    def validate(self, num_layers: int) -> None:
        group, kept, freed = self.geometry(num_layers)
        if freed < 1:
            raise ConfigError(
                f"LaCache.span {self.span} with LaCache.overlap {self.overlap} frees no slot on a {num_layers}-layer "
                f"model "
                f"(need 1 <= span < {num_layers} and 0 <= overlap < span with ceil(span/(span-overlap)) < "
                f"1 + ceil(({num_layers}-span)/(span-overlap)))"
            )
        low = self.min_cache_size(num_layers)
        if self.cache_size < low:
            raise ConfigError(
                f"LaCache.cache_size must be >= start_size + num_layers + {kept} = {low} for LaCache.span {self.span} "
                f"LaCache.overlap {self.overlap} LaCache.start_size {self.start_size} on {num_layers} layers, "
                f"got {self.cache_size}"
            )

    def max_cache_len(self, num_layers: int) -> int:
        _, _, freed = self.geometry(num_layers)
        return self.cache_size + (freed // 2 if self.compensate else 0)

    def layer_offsets(self, num_layers: int) -> torch.Tensor:
        """First slot each layer keeps inside a ladder group, ``LongTensor [L]`` in ``[0, R]``."""
        _, kept, freed = self.geometry(num_layers)
        layers = torch.arange(num_layers)
        if self.ladder_layout == "official":
            return layers % (freed + 1)
        return (layers // (self.span - self.overlap) - kept + 1).clamp(0, freed)

    # ------------------------------------------------------------------ one call
    def select(self, n: int, num_layers: int) -> Optional[torch.Tensor]:
        if n <= self._capacity:
            return None
        group, kept, freed = self.geometry(num_layers)
        if not self._compensated:
            self._compensated = True
            if self.compensate:
                self._capacity += freed // 2
        need = n - self._capacity
        if need <= 0:
            return None

        s, cursor, cap = self.start_size, self._cursor, self._capacity
        room = cap - cursor - num_layers
        capacity = (room // kept) * freed
        startover = need > capacity
        groups = room // kept if startover else ceil_div(need, freed)
        inner = torch.arange(kept)
        offsets = self.layer_offsets(num_layers)
        keep = ladder_index(n, cursor, groups, group, inner, offsets)
        if not startover:
            self._cursor = cursor + groups * kept
            return keep

        # Iterative compaction: compact the already compacted region again, from the sinks on.
        need2 = need - capacity
        full = ((cap - s - num_layers) // kept) * freed
        times, groups2 = self._startover_plan(need2, full, num_layers)
        if self._reads_past_end(keep.shape[1], times, groups2, num_layers):
            return self.startover_rounds(keep, full, num_layers)
        keep = torch.gather(keep, 1, self._startover_index(keep.shape[1], times, groups2, num_layers))
        self._cursor = s + groups2 * kept
        return keep

    # ------------------------------------------------------------------ startover (step 5 of the spec)
    def _startover_plan(self, need: int, full: int, num_layers: int):
        """``(times, groups)`` of the official startover freeing ``need`` slots (``full``: slots one pass frees)."""
        group, kept, _ = self.geometry(num_layers)
        times = ceil_div(need, full)
        return times, ceil_div(need, merged_group(group, times) - kept)

    def _startover_offsets(self, times: int, num_layers: int) -> torch.Tensor:
        """First entry each layer keeps inside a startover group, before the duplicate fix: ``LongTensor [L]``."""
        group, kept, _ = self.geometry(num_layers)
        freed2 = merged_group(group, times) - kept
        if self.ladder_layout == "official":
            return torch.arange(num_layers) % (freed2 + 1)
        return self.layer_offsets(num_layers) * times

    def _reads_past_end(self, n: int, times: int, groups: int, num_layers: int) -> bool:
        """Whether the official startover would read a slot ``>= n`` (the official code's ``IndexError``)."""
        group, kept, _ = self.geometry(num_layers)
        group2 = merged_group(group, times)
        last = self.start_size + int(self._startover_offsets(times, num_layers).max()) + group2 * (groups - 1)
        return last + times * (kept - 1) >= n

    def _startover_index(self, n: int, times: int, groups: int, num_layers: int) -> torch.Tensor:
        """Slots kept by a startover over ``n`` slots: ``LongTensor [L, n_keep]``."""
        group, kept, _ = self.geometry(num_layers)
        group2 = merged_group(group, times)
        # The official offset overruns the group when times >= 2 and A >= 2 (a token kept twice);
        # cap it at the last offset whose A entries stay in the group.
        offset2 = self._startover_offsets(times, num_layers).clamp(max=group2 - 1 - times * (kept - 1))
        return ladder_index(n, self.start_size, groups, group2, torch.arange(kept) * times, offset2)

    def fitting_need(self, n: int, need: int, full: int, num_layers: int) -> int:
        """The most slots, at most ``need``, that one official startover over ``n`` slots frees with every
        group ending before the newest slot (``start + groups * group2 < n``), so that every layer keeps
        it. At least 1 for a valid setting (``n > cache_size >= start + L + A >= start + B``).

        Each ``times`` serves the needs in ``((times - 1) * full, times * full]``; with ``times`` fixed
        the groups that fit cap the need at ``fits * freed2``. All ``times`` are tried at once.
        """
        group, kept, _ = self.geometry(num_layers)
        times = torch.arange(1, ceil_div(need, full) + 1)
        group2 = merged_group(group, times)
        fits = (n - 1 - self.start_size) // group2
        served = torch.minimum((times * full).clamp(max=need), fits * (group2 - kept))
        served = torch.where(served > (times - 1) * full, served, torch.zeros_like(served))
        return int(served.max())

    def startover_rounds(self, keep: torch.Tensor, full: int, num_layers: int) -> torch.Tensor:
        """Startover in rounds, where the official one would read past the end of the cache.

        That happens when a call frees many times what one pass can (a long prompt into a small
        cache): the official startover then merges so many groups that its last group, ``group2``
        slots wide, no longer fits in the step-4 list. Here each round is the official startover
        for :meth:`fitting_need` slots (its groups all end before the newest slot, which every layer keeps);
        rounds repeat on the shorter cache until it holds at most ``cache_size`` (+ compensation)
        slots. The cursor is set by the last round, as after an official startover.

        Parameters
        ----------
        keep : LongTensor ``[L, n]``, slots kept by step 4 of this call (in the cache before the call).
        full : int, slots one startover pass frees without merging groups.

        Returns
        -------
        LongTensor ``[L, n_keep]``, slots kept after the last round, ``n_keep <= cache length``.
        """
        _, kept, _ = self.geometry(num_layers)
        while keep.shape[1] > self._capacity:
            n = keep.shape[1]
            times, groups = self._startover_plan(self.fitting_need(n, n - self._capacity, full, num_layers),
                                                 full, num_layers)
            keep = torch.gather(keep, 1, self._startover_index(n, times, groups, num_layers))
            self._cursor = self.start_size + groups * kept
        return keep

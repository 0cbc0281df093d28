"""Sparse reads (:mod:`lacache_core.readers`, Quest): each layer's page bounds, the pages each query head of a
decode step reads, and the bytes read against a dense read."""
from __future__ import annotations

from typing import Optional

import torch

from ..masks import hide, visible


class SparseReads:
    """The page metadata of every layer and the byte counts of a cache read through ``reader``.

    Attributes
    ----------
    read_bytes, dense_read_bytes : bytes of keys, values and page metadata that decode steps read, and that they
        would read densely: their ratio is the read saving.
    metadata_read_bytes : the page metadata's part of ``read_bytes``.
    """

    def __init__(self, reader, num_layers: int):
        self.reader = reader
        self.pages = [None] * num_layers  # each layer's page (min, max) bounds, as last computed
        self.read_bytes = 0.0
        self.dense_read_bytes = 0.0
        self.metadata_read_bytes = 0.0

    def page_bytes(self, i: int) -> int:
        pages = self.pages[i]
        return 0 if pages is None else sum(t.numel() * t.element_size() for t in pages)

    def plan(self, step, layer_bytes: int, in_store: bool, slot_shift: Optional[torch.Tensor], rotation) -> None:
        """Before the kernel: a decode step's page bounds of its rotated keys (the pages are chosen in
        :meth:`narrow`, once the step's mask is known); prefill and the dense layers read every slot.

        ``layer_bytes``: the bytes the layer holds; ``in_store``: whether it holds own slots only (a store), not
        every slot of the view; ``slot_shift``: ``[b]``, by which each row's keys sit past the slots they would
        have alone (:func:`slot_shift`)."""
        if step.q_len != 1:
            return
        # bytes are counted per own slot of each row and head: a row's filler slots and a head's padding are neither
        # read by Quest nor part of a dense read of that row (stores hold own slots only; a dense padded layer all n)
        keys = step.key
        b, kv_heads, n = keys.shape[0], keys.shape[1], keys.shape[2]
        first = step.first_slots()
        first = None if first is None else first.expand(b, kv_heads)
        own = b * kv_heads * n if first is None else int((n - first).sum())
        stored = own if first is not None and in_store else b * kv_heads * n
        slot_bytes = layer_bytes / stored
        self.dense_read_bytes += slot_bytes * own
        if step.layer < self.reader.dense_layers:
            self.read_bytes += slot_bytes * own
            return
        if slot_shift is not None:
            keys = rotation.at(keys, slot_shift[:, None].expand(b, n), inverse=True)
        self.pages[step.layer] = self.reader.bounds(keys, first)
        step.read_plan = (slot_bytes, first, self, rotation, slot_shift)

    def narrow(self, step, mask):
        """``mask`` narrowed to the pages each query head reads (bool or additive like ``mask``; additive where it
        is ``None``), and the bytes this step reads counted: the page metadata, and of the KV bytes the share of
        slots that some query head of each KV head reads."""
        slot_bytes, first, _, rotation, shift = step.read_plan
        low, high = self.pages[step.layer]
        query, n = step.query, step.n
        if shift is not None:
            query = rotation.at(query, shift[:, None].expand(-1, query.shape[2]), inverse=True)
        seen = torch.ones(1, 1, 1, n, dtype=torch.bool, device=query.device) if mask is None else visible(mask)
        chosen = self.reader.selected(query, low, high, seen[..., -n:], first)
        b, heads, q = chosen.shape[:3]
        per_kv_head = chosen.view(b, low.shape[1], heads // low.shape[1], q, n).any(2).any(2)  # [b, kv_heads, n]
        metadata = self.page_bytes(step.layer)
        self.read_bytes += slot_bytes * int(per_kv_head.sum()) + metadata
        self.metadata_read_bytes += metadata
        if mask is None:
            return hide(chosen, query)
        if mask.dtype == torch.bool:
            return chosen
        return torch.where(chosen, mask[..., -n:], torch.finfo(mask.dtype).min)


def slot_shift(step, slot_positions: bool) -> Optional[torch.Tensor]:
    """Sparse reads under a slot method in a padded batch: each row's filler slots (``[b]``), by which its keys and
    query are rotated past the slots it would have alone. A page's bound is per channel, which a rotation of both
    sides changes, so pages are scored at the row's own slots (``None`` where no row has fillers)."""
    first = step.first_slots()
    if not slot_positions or first is None or not bool(first.any()):
        return None
    return first[:, 0]

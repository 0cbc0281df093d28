"""One layer's step: what the attention kernel reads, and what the cache needs after it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..masks import step_mask


@dataclass
class LayerStep:
    """Layer ``layer``'s attention inputs for one forward pass (:meth:`CompressedCache.attend` yields it).

    Attributes
    ----------
    query : ``[b, heads, q, d]``, rotated.
    key : ``[b, kv_heads, n, d]``, every slot of this step (the new ones last), rotated.
    value : ``[b, kv_heads, n, d]``.
    stored_key : the keys as the layer stores them (rotated or not): what compaction gathers.
    lengths : slots per KV head (``[kv_heads]``, ``[b, kv_heads]``) where the tensors are a left-padded per-head
        view, else ``None``.
    fillers : ``[b]``, the filler slots at the front of each row before this step's compaction, where the cache
        must mask the rows itself (padding, rows of different lengths), else ``None``.
    rows : the per-row policies of a batch, or ``None`` (one policy for every row).
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    stored_key: torch.Tensor
    lengths: Optional[torch.Tensor] = None
    fillers: Optional[torch.Tensor] = None
    rows: Optional[list] = None
    fillers_before: Optional[torch.Tensor] = None  # [b], each row's filler slots before this step's compaction
    model_mask: Any = None
    sliding_window: Optional[int] = None
    # sparse reads: (bytes per own slot, first own slots, the SparseReads that narrows the mask, rotation,
    # each row's slot shift), set by SparseReads.plan
    read_plan: Optional[tuple] = None
    _mask: Any = field(default=None, repr=False)
    _masked: bool = field(default=False, repr=False)

    @property
    def n(self) -> int:
        return self.key.shape[-2]

    @property
    def q_len(self) -> int:
        return self.query.shape[-2]

    @property
    def ragged(self) -> bool:
        """Whether the tensors are a padded per-head view (heads of different lengths)."""
        return self.lengths is not None

    @property
    def rows_masked(self) -> bool:
        """Whether the rows need the cache's own mask (fillers, padding)."""
        return self.fillers is not None

    def first_slots(self) -> Optional[torch.Tensor]:
        """The first slot of each row's (and, where heads differ in length, each head's) own tokens, past filler
        slots and a head's padding: ``[b, 1]``, ``[b | 1, kv_heads]``, or ``None`` (slot 0 everywhere). CPU."""
        if self.lengths is None:
            return None if self.fillers is None else self.fillers[:, None]
        first = self.n - self.lengths
        return first if first.dim() == 2 else first[None]

    @property
    def mask(self):
        """The mask for the kernel: the model's mask (:attr:`model_mask`) as this step's layout needs it."""
        if not self._masked:
            self._mask, self._masked = self.masked(self.model_mask), True
        return self._mask

    def masked(self, mask):
        """``mask`` (the model's, fitted to the keys) as this step's layout needs it, narrowed to the pages each
        query head reads where reads are sparse."""
        mask = step_mask(self, mask, self.sliding_window)
        if self.read_plan is None:
            return mask
        reads = self.read_plan[2]
        return reads.narrow(self, mask)

"""What every sparse reader shares: a :class:`lacache_core.params.Setting` that, at a decode step, chooses the
slots each query head reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch

from ..params import Setting


@dataclass(frozen=True)
class Reader(Setting):
    """A read-side choice, passed as ``make_cache(..., read=...)``: nothing is evicted, a decode step reads fewer slots.

    The cache asks, per layer from :attr:`dense_layers` on, for a summary of the layer's keys (:meth:`bounds`) before
    the kernel, and once the step's mask is known for the slots each query head reads (:meth:`selected`).
    """

    name: ClassVar[str] = "reader"
    #: Its flags are ``--<name>_<field>`` (``--quest_page_size``; a field's ``param(flag_name=...)`` aside).
    flag_prefix: ClassVar[Optional[str]] = None
    #: Leading layers that read every slot (a field of that name overrides it).
    dense_layers = 0

    def bounds(self, keys: torch.Tensor, first: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per page, what :meth:`selected` scores: ``keys`` ``[b, kv_heads, n, d]`` rotated; ``first`` ``[b, kv_heads]``
        each row's and head's first own slot (``None``: slot 0)."""
        raise NotImplementedError

    def selected(self, query: torch.Tensor, low: torch.Tensor, high: torch.Tensor, visible: torch.Tensor,
                 first: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[b, heads, q, n]`` bool: the slots each query head (``query`` ``[b, heads, q, d]``, rotated) reads of those
        ``visible`` (``[b, 1 | heads, q, n]``), given :meth:`bounds`' ``(low, high)``."""
        raise NotImplementedError

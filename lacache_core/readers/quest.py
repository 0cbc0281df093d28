"""Quest's hyper-parameters (Tang et al., ICML 2024, arXiv 2406.10774); its page choice is :mod:`lacache_core.quest`
(the rule, the references and where we differ are written there)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional, Tuple

import torch

from ..errors import ConfigError
from ..params import param
from ..quest import _own_slots, page_bounds, selected_tokens
from .base import Reader


@dataclass(frozen=True)
class Quest(Reader):
    """Quest (Tang et al. 2024): pages of slots with key min/max; each decode step's query heads read only their top
    pages; nothing is evicted.

    Parameters
    ----------
    token_budget : int
        Tokens each query head reads per decode step, as whole pages (the reference's ``--token_budget``,
        default 1024 in its pg19 script).
    page_size : int
        Consecutive cache slots per page (the reference's ``--chunk_size``, 16).
    dense_layers : int
        Leading layers that always read every slot (the reference: 2).
    rule : {"quest", "kvcache_factory"}
        ``quest``: Quest's own rule, ``max(3, token_budget // page_size)`` whole pages of all slots;
        ``kvcache_factory``: KVCache-Factory's ``select_quest_tokens``, the newest ``recent_size`` slots and the
        earliest slots of the prefix's top pages, ``token_budget`` slots exactly (:mod:`lacache_core.quest`).
    recent_size : int
        ``rule="kvcache_factory"``: newest slots always read (its ``recent_size``, default 0 there too).
    """

    name: ClassVar[str] = "quest"

    token_budget: int = param(1024, low=1, flag_name="quest_budget")
    page_size: int = param(16, low=1)
    dense_layers: int = param(2, low=0)
    rule: Literal["quest", "kvcache_factory"] = param("quest", added_later=True)
    recent_size: int = param(0, low=0, added_later=True)

    def check(self) -> None:
        if self.recent_size and self.rule != "kvcache_factory":
            raise ConfigError(f"Quest.recent_size {self.recent_size} needs Quest.rule kvcache_factory; "
                              f"Quest.rule {self.rule} has no recent window")

    def bounds(self, keys: torch.Tensor, first: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """:func:`lacache_core.quest.page_bounds` of the keys this rule pages: all of them, or under
        ``kvcache_factory`` the prefix's only (the recent window's slots count on no page)."""
        if self.rule == "quest":
            return page_bounds(keys, self.page_size, first)
        n = keys.shape[-2]
        own = _own_slots(n, first, keys.device)
        recent = (torch.arange(n, device=keys.device) >= n - self._recent(own)[..., None])[..., None]
        big = torch.finfo(keys.dtype).max
        low = page_bounds(keys.masked_fill(recent, big), self.page_size, first)[0]
        high = page_bounds(keys.masked_fill(recent, -big), self.page_size, first)[1]
        return low, high

    def selected(self, query: torch.Tensor, low: torch.Tensor, high: torch.Tensor, visible: torch.Tensor,
                 first: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:func:`lacache_core.quest.selected_tokens` under this setting."""
        return selected_tokens(self, query, low, high, visible, first)

    def _recent(self, own: torch.Tensor) -> torch.Tensor:
        """KVCache-Factory's recent window: ``min(own, recent_size, token_budget)`` slots per row and head."""
        return own.clamp(max=min(self.recent_size, self.token_budget))

    def pages_read(self, slots: int) -> int:
        """Pages each query head reads in a layer of ``slots`` slots (the reference's rule)."""
        pages = -(-slots // self.page_size)
        return min(max(3, min(slots, self.token_budget) // self.page_size), pages)

    def label(self) -> str:
        """``quest{token_budget}``, then ``p{page_size}d{dense_layers}`` where either differs from the default and
        ``_kvcf{recent_size}`` under ``rule="kvcache_factory"`` (the folder names results were recorded under)."""
        default = Quest()
        pages = "" if (self.page_size, self.dense_layers) == (default.page_size, default.dense_layers) else \
            f"p{self.page_size}d{self.dense_layers}"
        return f"{self.name}{self.token_budget}{pages}" + ("" if self.rule == default.rule else f"_kvcf{self.recent_size}")

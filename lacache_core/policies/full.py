"""Full cache: keeps everything (the no-compression reference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .base import CachePolicy


@dataclass
class FullCache(CachePolicy):
    """Never evicts. Keys keep their true positions, so no position shift is needed."""

    name: ClassVar[str] = "full"
    position_shift: ClassVar[bool] = False

    def select(self, n: int, num_layers: int) -> Optional[torch.Tensor]:
        return None

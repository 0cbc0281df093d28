"""Full cache: keeps everything (the no-compression reference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .base import CachePolicy


@dataclass
class FullCache(CachePolicy):
    """Never evicts; keys sit at their original positions, as in the unmodified model."""

    name: ClassVar[str] = "full"

    def select(self, n: int, num_layers: int) -> Optional[torch.Tensor]:
        return None

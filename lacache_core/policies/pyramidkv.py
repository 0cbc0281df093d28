"""PyramidKV (Cai et al., 2024): SnapKV's scoring with a per-layer budget shrinking with depth."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List

from ..errors import ConfigError
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV selection; layer budgets fall linearly from the first to the last layer.

    With ``C = cache_size`` and window ``w``: the last layer keeps ``(C - w) / beta`` prompt tokens,
    the first ``2 (C - w) - (C - w) / beta``, linearly in between (PyramidKV's schedule), plus the
    window; the average over layers stays ``C``, the same total budget as every other method.
    """

    name: ClassVar[str] = "pyramidkv"

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ConfigError(f"--beta must be >= 1, got {self.beta}")

    def layer_budgets(self, num_layers: int) -> List[int]:
        prompt = self.cache_size - self.window_size
        low = prompt / self.beta
        high = 2 * prompt - low
        if num_layers == 1:
            return [self.cache_size]
        step = (high - low) / (num_layers - 1)
        return [self.window_size + round(high - i * step) for i in range(num_layers)]

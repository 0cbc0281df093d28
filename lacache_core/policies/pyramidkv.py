"""PyramidKV (Cai et al., 2024): SnapKV's scoring with a per-layer budget shrinking with depth."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List

from .base import param
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV selection; layer budgets fall linearly from the first to the last layer.

    With ``C = cache_size`` and window ``w``: the last layer keeps ``(C - w) / beta`` prompt tokens,
    the first ``2 (C - w) - (C - w) / beta``, linearly in between (PyramidKV's schedule), plus the
    window; the average over layers stays ``C``, the same total budget as every other method.

    Parameters
    ----------
    beta : int
        Ratio of the first layer's prompt budget to the last layer's, roughly (PyramidKV's ``beta``).
    """

    name: ClassVar[str] = "pyramidkv"

    beta: int = param(20, low=1)

    def layer_budgets(self, num_layers: int) -> List[int]:
        prompt = self.cache_size - self.window_size
        low = prompt / self.beta
        high = 2 * prompt - low
        if num_layers == 1:
            return [self.cache_size]
        step = (high - low) / (num_layers - 1)
        return [self.window_size + round(high - i * step) for i in range(num_layers)]

"""PyramidKV (Cai et al., 2024): SnapKV's scoring with a per-layer budget shrinking with depth."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

from .base import param
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV selection; layer budgets fall linearly from the first to the last layer.

    KVCache-Factory's schedule (Zefan-Cai/KVCache-Factory @ c97f9d7, ``pyramidkv/pyramidkv_utils.py``,
    ``PyramidKVCluster.update_kv``), in integers: with ``C = cache_size``, window ``w``, ``P = C - w`` and
    a prompt of ``n`` tokens (the comparisons strict, as there; ``tests/core/test_pyramidkv_regimes.py``),

    * ``n < C``: every layer keeps the whole prompt;
    * ``C <= n < 2 P``: every layer makes SnapKV's choice at SnapKV's budget (``P`` prefix tokens and the
      window), the same in every layer; at ``n = C`` that choice is the whole prompt;
    * otherwise the last layer keeps ``lo = P // beta`` prefix tokens and the first ``hi = 2 P - lo``
      (``hi = n - w`` and ``lo = 2 P - hi`` when the prompt is shorter than that), layer ``l``
      keeping ``hi - l * ((hi - lo) // (L - 1))``: the step is floored, so deeper layers keep a few
      more than the linear schedule and the average is somewhat above ``C``, as in the reference.

    Parameters
    ----------
    beta : int
        Ratio of the first layer's prompt budget to the last layer's, roughly (PyramidKV's ``beta``).
    """

    name: ClassVar[str] = "pyramidkv"

    beta: int = param(20, low=1)

    def layer_budgets(self, num_layers: int, prompt_len: Optional[int] = None) -> List[int]:
        n, w, prefix = prompt_len, self.window_size, self.cache_size - self.window_size
        if n is not None and n < self.cache_size:
            return [n] * num_layers
        if num_layers == 1 or (n is not None and n < 2 * prefix):
            return [self.cache_size] * num_layers
        low = prefix // self.beta
        high = 2 * prefix - low
        if n is not None and high >= n - w:
            high = n - w
            low = 2 * prefix - high
        step = (high - low) // (num_layers - 1)
        return [w + high - i * step for i in range(num_layers)]

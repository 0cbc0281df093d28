"""SnapKV (Li et al., 2024): compress the prompt by what its last queries attend to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch.nn.functional as F

from ..errors import ConfigError
from .base import param
from .prefill import PrefillPolicy


@dataclass
class SnapKV(PrefillPolicy):
    """Keep, per KV head, the prompt tokens most attended by the last ``window_size`` prompt queries.

    Scores are summed over the window's queries (averaged over the query heads of each KV head)
    and pooled over ``kernel_size`` neighbours (``pooling`` max or avg); the window itself and the
    first ``start_size`` tokens are always kept. Compresses once after the prompt.

    Parameters
    ----------
    kernel_size : int
        Width of the pooling over neighbouring tokens (odd, so that pooling keeps the length).
    pooling : {"max", "avg"}
        How the window's scores are pooled.
    """

    name: ClassVar[str] = "snapkv"
    per_head: ClassVar[bool] = True

    kernel_size: int = param(7, low=1)
    pooling: Literal["max", "avg"] = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"--kernel_size must be odd (pooling keeps the length), got {self.kernel_size}")

    def pool(self, scores):
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        b, h, n = scores.shape
        return pool(scores.reshape(b * h, 1, n), self.kernel_size, stride=1,
                    padding=self.kernel_size // 2).reshape(b, h, n)

"""SnapKV (Li et al., 2024): compress the prompt by what its last queries attend to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch.nn.functional as F

from ..errors import ConfigError
from .base import param
from .merging import MergesEvicted
from .prefill import PrefillPolicy


@dataclass
class SnapKV(PrefillPolicy, MergesEvicted):
    """Keep, per KV head, the prompt tokens most attended by the last ``window_size`` prompt queries.

    Scores are the window's attention to the prefix (the prompt before the window), summed over
    the window's queries and averaged over the query heads of each KV head, then pooled over
    ``kernel_size`` neighbours (``pooling`` max or avg) within the prefix; the window is kept whole.
    Compresses once after the prompt. With ``start_size=0`` (the default) this is KVCache-Factory's
    ``SnapKVCluster`` (``pyramidkv/pyramidkv_utils.py``), GQA scores reduced by mean.

    Parameters
    ----------
    start_size : int
        Leading prompt tokens always kept (0, as in the reference; a sink count like the other methods' on request).
    kernel_size : int
        Width of the pooling over neighbouring tokens (odd, so that pooling keeps the length).
    pooling : {"max", "avg"}
        How the window's scores are pooled.
    """

    name: ClassVar[str] = "snapkv"
    per_head: ClassVar[bool] = True

    start_size: int = param(0, low=0)
    kernel_size: int = param(7, low=1)
    pooling: Literal["max", "avg"] = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"{type(self).__name__}.kernel_size must be odd (pooling keeps the length), got {self.kernel_size}")

    def pool(self, scores):
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        b, h, n = scores.shape
        return pool(scores.reshape(b * h, 1, n), self.kernel_size, stride=1,
                    padding=self.kernel_size // 2).reshape(b, h, n)

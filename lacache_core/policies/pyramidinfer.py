"""PyramidInfer (Yang et al., ACL Findings 2024), as the LaCache paper's baseline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

from .base import param
from .prefill import PrefillPolicy


@dataclass
class PyramidInfer(PrefillPolicy):
    """Per layer, keep the prompt tokens that the most recent prompt tokens attend to most.

    The ``window_size`` most recent prompt queries score every prompt token (attention averaged
    over all heads: one choice per layer); the retained share shrinks geometrically with depth
    (layer ``l`` gets a budget proportional to ``decay ** l``, scaled so the average over layers is
    ``cache_size``). Compresses once after the prompt.

    Parameters
    ----------
    decay : float
        Geometric shrink of the layer budget per layer, in (0, 1] (1: the same budget everywhere).
    """

    name: ClassVar[str] = "pyramidinfer"

    decay: float = param(0.95, above=0.0, high=1.0)

    def layer_budgets(self, num_layers: int, prompt_len: Optional[int] = None) -> List[int]:
        weights = [self.decay ** i for i in range(num_layers)]
        scale = self.cache_size * num_layers / sum(weights)
        return [max(self.start_size + self.window_size + 1, round(w * scale)) for w in weights]

"""CriticalKV (Feng et al., 2025, arXiv 2502.03805): re-rank a scorer's choice by what each value adds to the output.

Followed: kvpress's ``CriticalKVPress`` (``kvpress/presses/criticalkv_press.py``, NVIDIA/kvpress @ 8bb29b9), which
wraps any ``ScorerPress`` in two stages. Stage one keeps the scorer's top ``int(budget * first_stage_ratio)`` tokens
per KV head. Stage two ranks the others by ``(score + epsilon) * |W_o v|_1``: the L1 norm of each value through its
query heads' slices of the output projection, averaged over the query heads of its KV head. The budget is filled
from stage one, then stage two.

The output projection is the model's own, read from the attention module as the prompt passes. The scorer's sinks and window count as the top of stage one, as kvpress's
scorers pad them with the highest score. With Expected Attention as the scorer its value-norm factor is turned off,
as kvpress advises.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch

from ..errors import ConfigError
from .base import param
from .composed import ComposedPolicy
from .scoring import ensure_layer, with_protected

OUTPUT_PROJECTIONS = ("o_proj", "dense", "out_proj")


def output_projection(attention) -> torch.Tensor:
    """An attention module's output weight, ``[hidden, heads * head_dim]`` (the module's own tensor, not a copy)."""
    proj = next((getattr(attention, name) for name in OUTPUT_PROJECTIONS if hasattr(attention, name)), None)
    if proj is None:
        raise ConfigError(f"make_cache.method criticalkv needs each attention's output projection "
                          f"({', '.join(OUTPUT_PROJECTIONS)}); {type(attention).__name__} has none of them")
    return proj.weight


def projected_value_norms(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``|W_o^h v|_1`` per token, averaged over each KV head's query heads and the batch: ``[kv_heads, n]``.

    ``value``: ``[b, kv_heads, n, d]``; ``weight``: ``[hidden, heads * d]``.
    """
    b, kv_heads, n, d = value.shape
    heads = weight.shape[1] // d
    slices = weight.float().T.reshape(heads, d, -1)  # [heads, d, hidden]
    groups = heads // kv_heads
    norms = torch.stack([(value[:, h // groups].float() @ slices[h]).abs().sum(-1) for h in range(heads)], 1)
    return norms.view(b, kv_heads, groups, n).mean((0, 2))


@dataclass
class CriticalKV(ComposedPolicy):
    """After the prompt, keep per KV head the scorer's best tokens (stage one) and, for the rest of the budget, the
    tokens of best score times projected value norm (stage two).

    Parameters
    ----------
    first_stage_ratio : float
        Share of the budget chosen by the scorer alone (0.5 in kvpress).
    epsilon : float
        Added to a score before the value-norm product (1e-4 in kvpress's CriticalKV).
    """

    name: ClassVar[str] = "criticalkv"
    per_head: ClassVar[bool] = True
    scorer_overrides: ClassVar[dict] = {"expected_attention": {"use_vnorm": False}}

    first_stage_ratio: float = param(0.5, low=0.0, high=1.0)
    epsilon: float = param(1e-4, low=0.0)

    reads_weights: ClassVar[bool] = True

    _norms: List[Optional[torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._weight: Optional[torch.Tensor] = None  # this layer's output projection; not a field, never saved

    def check_budget(self, protected: int) -> None:
        if self.cache_size <= protected:
            raise ConfigError(f"CriticalKV.cache_size {self.cache_size} must exceed {self.scorer}'s {protected} sinks "
                              "and window slots")

    def read_weights(self, layer, attention):
        if attention is None:
            raise ConfigError("make_cache.method criticalkv reads each attention's output projection: run the model "
                              "with lacache_core.enable_position_shift(model)")
        self._weight = output_projection(attention)

    def _reset_state(self) -> None:
        super()._reset_state()
        self._norms = []

    def observe_values(self, layer, value, rotation):
        super().observe_values(layer, value, rotation)
        ensure_layer(self._norms, layer)
        if self._done or value.shape[2] <= self.cache_size:
            return
        self._norms[layer] = projected_value_norms(value, self._weight)

    def layer_keep(self, layer: int, n: int, budget: int) -> torch.Tensor:
        s, w = self.protected["start_size"], self.protected["window_size"]
        scores = self._window_scores[layer][:, s:]  # [kvh, n - s - w]
        count = budget - s - w
        first = max(0, min(count, int(budget * self.first_stage_ratio) - s - w))
        weighted = (scores + self.epsilon) * self._norms[layer][:, s:n - w]
        weighted.scatter_(-1, torch.topk(scores, first, dim=-1).indices, float("inf"))
        self._norms[layer] = None
        return with_protected(torch.topk(weighted, count, dim=-1).indices + s, s, w, n)

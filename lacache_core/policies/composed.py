"""Methods that re-rank another method's per-token scores (ChunkKV, CriticalKV), as kvpress's wrappers of a
``ScorerPress`` do: the inner method is one of our prefill-time scorers, named by ``scorer``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from .base import param
from .expected_attention import ExpectedAttention
from .keydiff import KeyDiff
from .lagkv import LagKV
from .prefill import PrefillPolicy
from .scoring import ensure_layer
from .snapkv import SnapKV

SCORERS = {cls.name: cls for cls in (SnapKV, KeyDiff, LagKV, ExpectedAttention)}
ScorerName = Literal["snapkv", "keydiff", "lagkv", "expected_attention"]


@dataclass
class ComposedPolicy(PrefillPolicy):
    """Base class: score the prompt with ``scorer`` (built with its own defaults and this budget), then choose in
    :meth:`layer_keep` from its scores (``self._window_scores[layer]``: ``[kv_heads, n - window]``), keeping its sinks
    and window.

    Parameters
    ----------
    scorer : {"snapkv", "keydiff", "lagkv", "expected_attention"}
        The prefill-time method whose per-token scores are re-ranked, with its own defaults. KNorm is not offered:
        it keeps its *lowest* scores.
    start_size : int, optional
        Leading tokens kept apart (``None``: the scorer's own, 0 for SnapKV).
    window_size : int, optional
        Last prompt tokens kept apart (``None``: the scorer's own, 32 for SnapKV).
    """

    observes_values: ClassVar[bool] = True
    #: Settings the inner scorer is built with beyond its defaults (CriticalKV turns Expected Attention's value norm off).
    scorer_overrides: ClassVar[dict] = {}

    cache_size: int = param(256, low=1)
    start_size: Optional[int] = param(None, low=0)
    window_size: Optional[int] = param(None, low=0)
    scorer: ScorerName = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        scorer = SCORERS[self.scorer]
        given = {"start_size": self.start_size, "window_size": self.window_size}
        self.protected = {k: getattr(scorer, k) if v is None else v for k, v in given.items()}  # a field's class default
        self.check_budget(self.protected["start_size"] + self.protected["window_size"])
        overrides = self.scorer_overrides.get(self.scorer, {})
        self.inner = scorer(cache_size=self.cache_size, **self.protected, **overrides)

    def check_budget(self, protected: int) -> None:
        """Raise a one-line :class:`ConfigError` where ``cache_size`` leaves no room beside ``protected`` slots."""

    def validate(self, num_layers: int) -> None:
        """Nothing more than :meth:`__post_init__` checked: every layer has the same budget."""

    def _reset_state(self) -> None:
        super()._reset_state()
        self.inner.reset()

    def observe_values(self, layer, value, rotation):
        if self.inner.observes_values:
            self.inner.observe_values(layer, value, rotation)

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._window_scores, layer)
        if self._done or key.shape[2] <= self.cache_size:
            return
        self.inner.observe(layer, query, key, scaling)
        self._window_scores[layer], self.inner._window_scores[layer] = self.inner._window_scores[layer], None

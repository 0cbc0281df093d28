"""Shared machinery of the prefill-time methods that score every prompt token (KeyDiff, LagKV, Expected Attention).

They follow kvpress's ``ScorerPress`` (``kvpress/presses/scorer_press.py``): a score per KV head and token, from the
layer's keys, values and queries, and per head the highest-scored tokens kept. Here the budget is ``cache_size``
slots (kvpress: ``int(n * (1 - compression_ratio))``), and like every prefill-time method the cache then grows
during decoding. A method's own sinks (kvpress's ``n_sink``) are its ``start_size``, kept as the reference keeps
them (their score is above every other token's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Tuple

import torch

from .base import param
from .prefill import PrefillPolicy
from .scoring import ensure_layer


@dataclass
class ScorerPolicy(PrefillPolicy):
    """Base class: after the prompt, keep per KV head the ``cache_size`` tokens of highest :meth:`score`.

    Parameters
    ----------
    window_size : int
        Last prompt tokens always kept (0, as kvpress's scorers keep none apart).
    """

    observes_values: ClassVar[bool] = True
    per_head: ClassVar[bool] = True

    start_size: int = param(0, low=0)
    window_size: int = param(0, low=0)

    _step_inputs: Optional[Tuple[torch.Tensor, object]] = field(default=None, init=False, repr=False)

    def score(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rotation, scaling: float) -> torch.Tensor:
        """Scores of every token of the prompt, higher kept first.

        Parameters
        ----------
        query : ``[b, heads, n, d]``, the prompt's queries, rotated at positions ``0 .. n - 1``.
        key, value : ``[b, kv_heads, n, d]``, keys rotated as the queries.
        rotation : the model's :class:`lacache_core.rope.Rotation`.
        scaling : the attention's softmax scale.

        Returns
        -------
        ``[b, kv_heads, n]`` scores.
        """
        raise NotImplementedError

    def observe_values(self, layer, value, rotation):
        self._step_inputs = (value, rotation)

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._window_scores, layer)
        inputs, self._step_inputs = self._step_inputs, None
        if self._done or key.shape[2] <= self.cache_size:  # a prompt within the budget is kept whole, unscored
            return
        value, rotation = inputs
        scores = self.score(query, key, value, rotation, scaling).float().mean(0)  # [kvh, n]
        self._window_scores[layer] = scores[:, :key.shape[2] - self.window_size]

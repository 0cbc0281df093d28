"""HeadKV (Fu et al., ICLR 2025, "Not All Heads Matter: A Head-Level KV Cache Compression Method with
Integrated Retrieval and Reasoning", arXiv 2410.19258): per-head budgets from how much each head
retrieves and reasons, measured offline once per model.

The budgets follow KVCache-Factory's ``run_longbench.py`` (``--method headkv``) and ``HeadKVCluster``
(``pyramidkv/pyramidkv_utils.py``): a head's score is the mean of its list in the scores file,
scores are normalised over all the model's (layer, query head) pairs, and with prefix budget ``P``

    cap[l, h] = round(score[l, h] * (P // head_beta) * L * H + (P - P // head_beta))

(GQA: the mean over each KV head's query heads, rounded). Each head keeps its ``cap`` best prefix
tokens by SnapKV's pooled window scores, plus the window. The reference applies the formula to
``max_capacity_prompt``, window included, and then adds the window, so each head holds about a
window more than the budget; we apply it to ``P = cache_size - window_size`` so that HeadKV's layers
hold the same total as every other method's. ``scripts/head_scores.py`` computes a scores file
(``{"layer-head": [scores]}``, the reference's format) for any model.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, List, Optional

import torch

from ..errors import ConfigError
from .adakv import head_rows
from .base import param
from .snapkv import SnapKV


def read_head_scores(path: str) -> dict:
    """``{(layer, head): mean score}`` from a JSON file of ``{"layer-head": [float, ...]}`` (the first line, as the
    reference reads it, or the whole file). A file read before and unchanged since is not parsed again (a
    prompt harness builds one policy per sample)."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise ConfigError(f"HeadKV.head_scores {path}: cannot read it ({err.strerror})") from None
    return dict(_parse_head_scores(str(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _parse_head_scores(path: str, mtime_ns: int, size: int) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"HeadKV.head_scores {path}: cannot read it ({err.strerror})") from None
    try:
        table = json.loads(text)
    except json.JSONDecodeError:
        try:
            table = json.loads(text.splitlines()[0])
        except (json.JSONDecodeError, IndexError):
            raise ConfigError(f"HeadKV.head_scores {path}: not a JSON object of \"layer-head\": [scores]") from None
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"HeadKV.head_scores {path}: not a JSON object of \"layer-head\": [scores]")
    out = {}
    for name, scores in table.items():
        parts = name.split("-")
        values = scores if isinstance(scores, list) else [scores]
        if (len(parts) != 2 or not all(p.isdigit() for p in parts) or not values
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise ConfigError(f"HeadKV.head_scores {path}: entry {name!r} is not \"layer-head\": [numbers]")
        out[(int(parts[0]), int(parts[1]))] = sum(values) / len(values)
    return out


def head_capacities(scores: torch.Tensor, prefix_budget: int, head_beta: float) -> torch.Tensor:
    """KVCache-Factory's rule: ``[L, H]`` mean head scores -> ``[L, H]`` prefix slots per (layer, query head)."""
    share = scores / scores.sum()
    layers, heads = scores.shape
    pool = (prefix_budget // head_beta) * layers * heads
    return torch.round(share * pool + (prefix_budget - prefix_budget // head_beta)).long()


@dataclass
class HeadKV(SnapKV):
    """SnapKV's per-head choice, each head with its own budget from retrieval-reasoning head scores.

    Parameters
    ----------
    head_scores : str
        JSON file of head scores, ``{"layer-head": [scores]}`` (``python scripts/head_scores.py`` makes one).
    head_beta : float
        How much of the budget is shared out by score (KVCache-Factory's ``--head_beta``, 1.01: nearly all);
        every head keeps at least ``P - P // head_beta`` prefix slots.
    """

    name: ClassVar[str] = "headkv"
    merge_refused: ClassVar[str] = "its heads keep different numbers of slots (KVCache-Factory's HeadKV ignores --merge)"
    ragged: ClassVar[bool] = True

    head_scores: Optional[str] = param(None, file=True)
    head_beta: float = param(1.01, low=1.0)

    _table: Optional[dict] = field(default=None, init=False, repr=False)
    _caps: Optional[torch.Tensor] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_scores is None:
            raise ConfigError("make_cache.method headkv needs HeadKV.head_scores FILE (make one: python scripts/head_scores.py "
                              "--model_name_or_path MODEL)")
        self._table = read_head_scores(self.head_scores)

    def max_cache_len(self, num_layers: int) -> Optional[int]:
        return None  # one head may keep up to the whole prompt

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        layers = 1 + max(layer for layer, _ in self._table)
        if layers != num_layers:
            raise ConfigError(f"HeadKV.head_scores {self.head_scores} scores {layers} layers, the model has {num_layers}")

    def caps(self, query_heads: int, kv_heads: int) -> torch.Tensor:
        """Prefix slots per (layer, KV head): ``LongTensor [L, kv_heads]``."""
        heads = 1 + max(head for _, head in self._table)
        if heads != query_heads or len(self._table) != self._num_layers * query_heads:
            raise ConfigError(f"HeadKV.head_scores {self.head_scores} has {len(self._table)} entries for {heads} heads a "
                              f"layer; the model has {self._num_layers} layers of {query_heads} heads")
        scores = torch.tensor([[self._table[(layer, h)] for h in range(query_heads)]
                               for layer in range(self._num_layers)], dtype=torch.float64)
        prefix = self.cache_size - self.start_size - self.window_size
        per_query_head = head_capacities(scores, prefix, self.head_beta)
        return per_query_head.view(self._num_layers, kv_heads, -1).double().mean(-1).round().long()

    def observe(self, layer, query, key, scaling):
        if not self._done and layer == 0:
            self._caps = self.caps(query.shape[1], key.shape[1])
        super().observe(layer, query, key, scaling)

    def layer_keep(self, layer: int, n: int, budget: int) -> List[torch.Tensor]:
        return head_rows(self._window_scores[layer], self._caps[layer].tolist(), self.start_size, self.window_size, n)

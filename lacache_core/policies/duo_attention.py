"""DuoAttention (Xiao et al., ICLR 2025, arXiv 2410.10819): retrieval heads keep every token, streaming heads only
their sinks and a recent window.

Followed: kvpress's ``DuoAttentionPress`` (``kvpress/presses/duo_attention_press.py``, NVIDIA/kvpress @ 8bb29b9).
Each (layer, KV head) has a score in [0, 1] (how much it needs the full context); the lowest-scored
``round(layers * kv_heads * head_compression_ratio)`` of all of them become streaming heads. After the prompt, a
streaming head keeps its first ``start_size`` and last ``recent_window`` tokens, a retrieval head all of them; heads
are stored at their own lengths (real memory, as AdaKV's), and every head grows by the tokens decoded, as in kvpress
(DuoAttention's own decoder keeps its streaming heads at a constant size).

Scores come from a file (``duo_patterns``):

* DuoAttention's published patterns (mit-han-lab/duo-attention ``attn_patterns/<model>/<run>/``): the folder, or its
  ``full_attention_heads.tsv`` (one row per layer, one column per KV head), with the ``config.json`` beside it giving
  ``sink_size`` and ``recent_size``; scores clipped to [0, 1] as the reference loads them;
* or the JSON that ``scripts/duo_patterns.py`` writes for any model with kvpress's on-the-fly scoring:
  ``{"sink_size": 128, "recent_size": 256, "scores": [[...] per layer]}``.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, List, Optional, Tuple

import torch

from ..errors import ConfigError
from .base import CachePolicy, param

TSV_NAME = "full_attention_heads.tsv"
#: kvpress's sink and recent sizes for patterns scored on the fly (``duo_attention_on_the_fly``).
ON_THE_FLY_SIZES = (128, 256)


def read_patterns(path: str) -> Tuple[torch.Tensor, Optional[int], Optional[int]]:
    """``(scores [layers, kv_heads] in [0, 1], sink_size, recent_size)`` from a patterns file or folder (the sizes
    ``None`` where the file gives none). A file read before and unchanged since is not parsed again."""
    target = Path(path) / TSV_NAME if Path(path).is_dir() else Path(path)
    try:
        stat = os.stat(target)
    except OSError as err:
        raise ConfigError(f"DuoAttention.duo_patterns {path}: cannot read {target} ({err.strerror})") from None
    scores, sink, recent = _parse_patterns(str(target), stat.st_mtime_ns, stat.st_size)
    return scores.clone(), sink, recent


@functools.lru_cache(maxsize=8)
def _parse_patterns(path: str, mtime_ns: int, size: int):
    bad = f"DuoAttention.duo_patterns {path}: "
    text = Path(path).read_text()
    if path.endswith(".json"):
        try:
            table = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(bad + "not JSON") from None
        rows = table.get("scores") if isinstance(table, dict) else None
        sink, recent = (table.get("sink_size"), table.get("recent_size")) if isinstance(table, dict) else (None, None)
    else:
        try:
            rows = [[float(x) for x in line.split()] for line in text.splitlines() if line.strip()]
        except ValueError:
            raise ConfigError(bad + "not a table of numbers (one row per layer, one column per KV head)") from None
        config = Path(path).with_name("config.json")
        sizes = json.loads(config.read_text()) if config.exists() else {}
        sink, recent = sizes.get("sink_size"), sizes.get("recent_size")
    if (not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows)
            or len({len(r) for r in rows}) != 1
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in rows for v in r)):
        raise ConfigError(bad + "scores must be a non-empty table, one row of numbers per layer, one column per KV head")
    for name, value in (("sink_size", sink), ("recent_size", recent)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(bad + f"{name} must be an integer >= 0, got {value!r}")
    return torch.tensor(rows, dtype=torch.float64).clamp(0, 1), sink, recent


def streaming_heads(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[layers, kv_heads]`` bool: the ``round(size * ratio)`` lowest-scored heads of all layers (ties: the first)."""
    count = round(scores.numel() * ratio)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.argsort(scores.flatten(), stable=True)[:count]] = True
    return mask.view(scores.shape)


@dataclass
class DuoAttention(CachePolicy):
    """After the prompt, streaming heads keep their sinks and recent window, retrieval heads every token.

    Parameters
    ----------
    duo_patterns : str
        Head scores: DuoAttention's published patterns (folder or ``full_attention_heads.tsv``) or the JSON of
        ``python scripts/duo_patterns.py``.
    head_compression_ratio : float
        Share of all (layer, KV head) pairs made streaming heads, the lowest-scored first (kvpress's parameter).
    start_size : int, optional
        Sinks a streaming head keeps (``None``: the patterns' ``sink_size``, else 128 as kvpress on the fly).
    recent_window : int, optional
        Newest tokens a streaming head keeps (``None``: the patterns' ``recent_size``, else 256).
    """

    name: ClassVar[str] = "duo_attention"
    observes: ClassVar[bool] = True
    prefill_only: ClassVar[bool] = True
    ragged: ClassVar[bool] = True

    duo_patterns: Optional[str] = param(None, file=True)
    head_compression_ratio: float = param(0.5, low=0.0, high=1.0)
    start_size: Optional[int] = param(None, low=0)
    recent_window: Optional[int] = param(None, low=1)

    _streaming: Optional[torch.Tensor] = field(default=None, init=False, repr=False)
    _kv_heads: int = field(default=0, init=False, repr=False)
    _done: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.duo_patterns is None:
            raise ConfigError("make_cache.method duo_attention needs DuoAttention.duo_patterns FILE (DuoAttention's "
                              "published patterns, or make one with scripts/duo_patterns.py)")
        scores, sink, recent = read_patterns(self.duo_patterns)
        self._sizes = (self.start_size if self.start_size is not None else (ON_THE_FLY_SIZES[0] if sink is None else sink),
                       self.recent_window if self.recent_window is not None else (ON_THE_FLY_SIZES[1] if recent is None else recent))
        self._streaming = streaming_heads(scores, self.head_compression_ratio)

    def _reset_state(self) -> None:
        self._done, self._kv_heads = False, 0

    def max_cache_len(self, num_layers: int) -> Optional[int]:
        return None  # retrieval heads keep the whole prompt

    def validate(self, num_layers: int) -> None:
        if self._streaming.shape[0] != num_layers:
            raise ConfigError(f"DuoAttention.duo_patterns {self.duo_patterns} scores {self._streaming.shape[0]} layers, "
                              f"the model has {num_layers}")

    def head_budgets(self, layer: int, prompt_len: int) -> List[int]:
        """Slots each KV head of ``layer`` keeps after a prompt of ``prompt_len`` tokens."""
        sink, recent = self._sizes
        streamed = min(prompt_len, sink + recent)
        return [streamed if s else prompt_len for s in self._streaming[layer].tolist()]

    def layer_budgets(self, num_layers: int, prompt_len: Optional[int] = None) -> List[Optional[int]]:
        """Slots the longest head of each layer keeps after a prompt of ``prompt_len`` tokens (``None``: unbounded)."""
        return [None if prompt_len is None else max(self.head_budgets(i, prompt_len)) for i in range(num_layers)]

    def observe(self, layer, query, key, scaling):
        if not self._done and key.shape[1] != self._streaming.shape[1]:
            raise ConfigError(f"DuoAttention.duo_patterns {self.duo_patterns} scores {self._streaming.shape[1]} KV heads "
                              f"a layer, the model has {key.shape[1]}")

    def keep(self, layer: int, n: int):
        if self._done:
            return None
        if layer == self._num_layers - 1:
            self._done = True  # the first forward pass (the prompt) ends with this layer
        sink, recent = self._sizes
        streaming = self._streaming[layer]
        if n <= sink + recent or not streaming.any():
            return None
        window = torch.cat([torch.arange(sink), torch.arange(n - recent, n)])
        return [window if is_streaming else torch.arange(n) for is_streaming in streaming.tolist()]

"""Quest: query-aware page selection at read time (Tang et al., ICML 2024, "Quest: Query-Aware Sparsity for
Efficient Long-Context LLM Inference", arXiv 2406.10774; reference code github.com/mit-han-lab/Quest at 01c1623,
``evaluation/quest_attention.py``, the accuracy-evaluation path its pg19, passkey and LongBench scripts use).

The cache's slots are cut into pages of ``page_size`` consecutive slots. Each page carries, per KV head and
channel, the min and max of its rotated keys. At a decode step, each query head bounds the score any key of
a page can reach, ``sum_d max(q_d * max_d, q_d * min_d)``, and attends only to the tokens of its
``max(3, budget // page_size)`` pages with the highest bounds (all pages where there are fewer). Nothing is
evicted: Quest saves reads, not memory, and the page metadata is memory on top of the keys and values.
It composes with any ``--method``: it reads a subset of whatever slots that method keeps (Quest over a
LaCache cache is a bounded cache read sparsely).

Following the reference:

* prefill (a step of more than one token) attends densely, and so do the first ``dense_layers`` layers;
* the budget is ``min(slots, token_budget)``, so even a cache shorter than the budget is read sparsely
  once it spans more pages than ``budget // page_size``;
* the page choice is per query head (the reference repeats the KV heads first); a page's bound counts
  every key in it, and a page none of whose tokens the mask lets the query see scores lowest.

Where we differ: the reference numbers layers from 32 down (``enable_quest_attention_eval``), so on a model
that does not have 32 layers its "first two layers" are not layers 0 and 1; we count from layer 0. The
reference recomputes the page min and max from all keys at every step (as we do); a paged kernel would
update them as pages fill. The metadata is held between steps, so the bytes reported are what is held.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .errors import ConfigError

READ_METHODS = ("none", "quest")


@dataclass(frozen=True)
class Quest:
    """Hyper-parameters of Quest's page selection.

    Parameters
    ----------
    token_budget : int
        Tokens each query head reads per decode step, as whole pages (the reference's ``--token_budget``,
        default 1024 in its pg19 script).
    page_size : int
        Consecutive cache slots per page (the reference's ``--chunk_size``, 16).
    dense_layers : int
        Leading layers that always read every slot (the reference: 2).
    """

    token_budget: int = 1024
    page_size: int = 16
    dense_layers: int = 2

    def __post_init__(self):
        if self.token_budget < 1:
            raise ConfigError(f"--quest_budget must be >= 1, got {self.token_budget}")
        if self.page_size < 1:
            raise ConfigError(f"--quest_page_size must be >= 1, got {self.page_size}")
        if self.dense_layers < 0:
            raise ConfigError(f"--quest_dense_layers must be >= 0, got {self.dense_layers}")

    def pages_read(self, slots: int) -> int:
        """Pages each query head reads in a layer of ``slots`` slots (the reference's rule)."""
        pages = -(-slots // self.page_size)
        return min(max(3, min(slots, self.token_budget) // self.page_size), pages)


def read_config(read: str, token_budget: int, page_size: int, dense_layers: int) -> Optional[Quest]:
    """The ``--read`` flags as a :class:`Quest`, or ``None`` for ``--read none``."""
    if read not in READ_METHODS:
        raise ConfigError(f"--read must be one of {list(READ_METHODS)}, got {read!r}")
    return None if read == "none" else Quest(token_budget, page_size, dense_layers)


def page_index(n: int, page_size: int, first: Optional[torch.Tensor] = None, device=None) -> Tuple[torch.Tensor, int]:
    """The page of each of ``n`` slots: ``([b | 1, kv_heads | 1, n], pages)``.

    Pages start at each row's (and head's) first own slot, ``first`` (``[b, kv_heads]``; ``None``: slot 0), so a
    row of a padded batch is paged as it would be alone. Slots before ``first`` (fillers) are on page ``pages``,
    which no query reads.
    """
    slots = torch.arange(n, device=device)
    if first is None:
        return (slots // page_size)[None, None], -(-n // page_size)
    relative = slots - first.to(device)[..., None]
    pages = -(-(n - int(first.min())) // page_size)
    return torch.where(relative >= 0, relative.div(page_size, rounding_mode="floor"), pages), pages


def page_bounds(keys: torch.Tensor, page_size: int, first: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per page, the channel-wise min and max of ``keys``.

    Parameters
    ----------
    keys : ``[b, kv_heads, n, d]``, rotated.
    first : ``[b, kv_heads]``, optional: each row's and head's first own slot (:func:`page_index`).

    Returns
    -------
    ``(low, high)``, each ``[b, kv_heads, pages, d]``: ``ceil(n / page_size)`` pages from slot 0, the last
    possibly partial. A page that holds no slot of a row has ``low = +max``, ``high = -max``.
    """
    b, h, n, d = keys.shape
    pages = page_index(n, page_size, first)[1]
    big = torch.finfo(keys.dtype).max
    if first is None:
        return _bounds(keys, page_size, pages, big)
    low, high = keys.new_full((b, h, pages, d), big), keys.new_full((b, h, pages, d), -big)
    for j, row in enumerate(first.expand(b, h).tolist()):  # a row's (or head's) own slots, paged from its first
        for g, start in enumerate(row):
            own = -(-(n - start) // page_size)
            low[j, g, :own], high[j, g, :own] = _bounds(keys[j, g, start:], page_size, own, big)
    return low, high


def _bounds(keys: torch.Tensor, page_size: int, pages: int, big: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Min and max over pages of ``page_size`` slots along dim -2 (the last page padded so it ignores the padding)."""
    pad = pages * page_size - keys.shape[-2]
    shape = (*keys.shape[:-2], pages, page_size, keys.shape[-1])
    low = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=big).view(shape).amin(-2)
    high = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=-big).view(shape).amax(-2)
    return low, high


def page_scores(query: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound on ``q . k`` over each page: ``sum_d max(q_d * high_d, q_d * low_d)``.

    Parameters
    ----------
    query : ``[b, heads, q, d]``, rotated.
    low, high : ``[b, kv_heads, pages, d]`` (:func:`page_bounds`); each KV head serves ``heads / kv_heads``
        query heads.

    Returns
    -------
    ``[b, heads, q, pages]``, float32.
    """
    groups = query.shape[1] // low.shape[1]
    low, high = low.repeat_interleave(groups, 1).float(), high.repeat_interleave(groups, 1).float()
    q = query.float()[..., None, :]  # [b, heads, q, 1, d]
    return torch.maximum(q * high[:, :, None], q * low[:, :, None]).sum(-1)


def selected_tokens(config: Quest, query: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                    visible: torch.Tensor, first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The slots each query head reads: its top pages by :func:`page_scores`, less what ``visible`` hides.

    Parameters
    ----------
    visible : ``[b, 1 | heads, q, n]`` bool, the slots the step's mask lets each query see.
    first : ``[b, kv_heads]``, optional, as for :func:`page_bounds`: each row and head reads
        :meth:`Quest.pages_read` of its own slots' count.

    Returns
    -------
    ``[b, heads, q, n]`` bool.
    """
    b, heads, q, n = *query.shape[:3], visible.shape[-1]
    groups = heads // low.shape[1]
    page_of, pages = page_index(n, config.page_size, first, query.device)
    page_of = page_of.expand(b, low.shape[1], n).repeat_interleave(groups, 1)[:, :, None].expand(b, heads, q, n)
    seen = torch.zeros(b, heads, q, pages + 1, device=query.device).scatter_reduce_(
        -1, page_of, visible.expand(b, heads, q, n).float(), "amax")[..., :pages] > 0
    scores = page_scores(query, low, high).masked_fill(~seen, float("-inf"))
    own = torch.full((b, low.shape[1]), n, device=query.device) if first is None else n - first.to(query.device)
    limit = torch.tensor([[config.pages_read(int(m)) for m in row] for row in own.tolist()], device=query.device)
    top = scores.topk(int(limit.max()), dim=-1).indices  # [b, heads, q, k], best first
    ranked = torch.arange(top.shape[-1], device=query.device) < limit.repeat_interleave(groups, 1)[:, :, None, None]
    chosen = torch.zeros(b, heads, q, pages + 1, dtype=torch.bool, device=query.device).scatter_(-1, top, ranked)
    return chosen.gather(-1, page_of) & visible

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

``rule="kvcache_factory"`` reads what KVCache-Factory's ``select_quest_tokens`` returns instead
(Zefan-Cai/KVCache-Factory @ c97f9d7, ``pyramidkv/quest.py``), for comparing with numbers published from that
library: the newest ``r = min(slots, recent_size, token_budget)`` slots always, and of the slots before them
(the prefix, paged from its first slot, bounds over the prefix's keys only) the top
``ceil((token_budget - r) / page_size)`` pages (one more where the prefix ends in a partial page and not every
page is taken), of whose slots the earliest ``token_budget - r`` are read: exactly ``token_budget`` slots, all
of them when the layer holds no more. Our default reads ``max(3, token_budget // page_size)`` whole pages of
all slots, as Quest's own code does, so a budget that is not a multiple of ``page_size`` reads fewer tokens
than the budget, and the newest tokens compete for pages like any other.

This module holds the page choice; the hyper-parameters are :class:`lacache_core.readers.Quest`, which imports this
module (never the other way round).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# ``Quest`` in annotations is lacache_core.readers.Quest, not imported: it imports this module


#: Whose page rule ``Quest.rule`` follows: Quest's own (mit-han-lab/Quest), or KVCache-Factory's.
QUEST_RULES = ("quest", "kvcache_factory")


def _own_slots(n: int, first: Optional[torch.Tensor], device) -> torch.Tensor:
    """Each row's and head's own slots of ``n`` (past ``first``, :func:`page_index`):
    ``LongTensor [b | 1, kv_heads | 1]``."""
    if first is None:
        return torch.full((1, 1), n, dtype=torch.long, device=device)
    return n - first.to(device).long()


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
    """The slots each query head reads under ``config.rule``: its top pages by :func:`page_scores` (and under
    ``kvcache_factory`` the recent window, the pages trimmed to the budget), less what ``visible`` hides.

    Parameters
    ----------
    query : ``[b, heads, q, d]``, rotated.
    low, high : ``[b, kv_heads, pages, d]``, from :meth:`Quest.bounds`.
    visible : ``[b, 1 | heads, q, n]`` bool, the slots the step's mask lets each query see.
    first : ``[b, kv_heads]``, optional, as for :func:`page_bounds`: each row and head reads
        :meth:`Quest.pages_read` of its own slots' count.

    Returns
    -------
    ``[b, heads, q, n]`` bool.
    """
    b, heads, q, n = *query.shape[:3], visible.shape[-1]
    kv_heads = low.shape[1]
    groups = heads // kv_heads
    page_of, pages = page_index(n, config.page_size, first, query.device)
    page_of = page_of.expand(b, kv_heads, n).repeat_interleave(groups, 1)[:, :, None].expand(b, heads, q, n)
    visible = visible.expand(b, heads, q, n)
    seen = torch.zeros(b, heads, q, pages + 1, device=query.device).scatter_reduce_(
        -1, page_of, visible.float(), "amax")[..., :pages] > 0
    scores = page_scores(query, low, high).masked_fill(~seen, float("-inf"))
    own = _own_slots(n, first, query.device).expand(b, kv_heads)
    if config.rule == "kvcache_factory":
        return _factory_tokens(config, scores, page_of, own, visible)
    limit = torch.tensor([[config.pages_read(int(m)) for m in row] for row in own.tolist()], device=query.device)
    return _top_pages(scores, limit).gather(-1, page_of) & visible


def _per_query_head(counts: torch.Tensor, heads: int) -> torch.Tensor:
    """``[b, kv_heads]`` counts as ``[b, heads, 1, 1]``, each KV head's for its query heads."""
    return counts.repeat_interleave(heads // counts.shape[1], 1)[:, :, None, None]


def _top_pages(scores: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``[b, heads, q, pages + 1]`` bool: each query head's ``limit`` (``[b, kv_heads]``) best-scored pages of
    ``scores`` (``[b, heads, q, pages]``); the extra page (fillers', :func:`page_index`) is never chosen."""
    b, heads, q, pages = scores.shape
    top = scores.topk(int(limit.max()), dim=-1).indices  # best first
    ranked = torch.arange(top.shape[-1], device=scores.device) < _per_query_head(limit, heads)
    chosen = torch.zeros(b, heads, q, pages + 1, dtype=torch.bool, device=scores.device)
    return chosen.scatter_(-1, top, ranked)


def _factory_tokens(config: Quest, scores: torch.Tensor, page_of: torch.Tensor, own: torch.Tensor,
                    visible: torch.Tensor) -> torch.Tensor:
    """KVCache-Factory's ``select_quest_tokens`` (module docstring) as ``[b, heads, q, n]`` bool.

    ``scores``: ``[b, heads, q, pages]``; ``page_of``, ``visible``: ``[b, heads, q, n]``; ``own``: ``[b, kv_heads]``
    slots each row and head holds (the last of the ``n``).
    """
    heads, n, size = scores.shape[1], page_of.shape[-1], config.page_size
    recent = config._recent(own)
    prefix, spare = own - recent, config.token_budget - recent
    prefix_pages, wanted = -(-prefix // size), -(-spare // size)
    # a partial last page holds fewer than page_size slots: one more page keeps the trimmed read at the budget
    wanted = wanted + ((prefix % size != 0) & (wanted < prefix_pages)).long()
    beyond = torch.arange(scores.shape[-1], device=scores.device) >= _per_query_head(prefix_pages, heads)
    chosen = _top_pages(scores.masked_fill(beyond, float("-inf")), torch.minimum(wanted, prefix_pages))
    relative = torch.arange(n, device=scores.device) - (n - _per_query_head(own, heads))  # own slots from 0
    prefix_slot = (relative >= 0) & (relative < _per_query_head(prefix, heads))
    chosen = chosen.gather(-1, page_of) & prefix_slot & visible
    chosen &= chosen.cumsum(-1) <= _per_query_head(spare, heads)  # the earliest slots of the pages, as it sorts them
    everything = _per_query_head(own <= config.token_budget, heads) & (relative >= 0)
    return (chosen | (relative >= _per_query_head(prefix, heads)) | everything) & visible

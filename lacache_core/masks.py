"""What the attention masks a compressed cache runs with say about padding (both attention paths)."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError


def visible(mask: torch.Tensor) -> torch.Tensor:
    """Where a mask (bool, or additive with the dtype's min for hidden keys) lets a query see a key: bool, same shape."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def own_key_visible(mask: torch.Tensor) -> torch.Tensor:
    """Whether each new token may see its own key: ``[b, q]`` bool, from a 4D mask ``[b, 1 | heads, q, n]``
    (bool or additive) fitted to the keys. Causal and sliding-window masks always let a token see itself; only
    padding hides it."""
    q, n = mask.shape[-2], mask.shape[-1]
    own = mask[..., torch.arange(q), torch.arange(n - q, n)]
    return visible(own).all(1)


def refuse_padding(mask, layer_idx: int) -> None:
    """A padded batch is not supported on this path: refuse it in one line (``mask`` as :func:`own_key_visible`)."""
    if layer_idx != 0 or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return
    if not bool(own_key_visible(mask).all()):
        raise ConfigError("a padded batch (attention_mask with zeros) cannot run with a compressed cache yet: pad "
                          "slots would count as tokens; give rows of the same length, or one row at a time")


def hide(allowed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An additive mask of ``like``'s dtype: 0 where ``allowed``, the dtype's minimum elsewhere."""
    return torch.zeros((), dtype=like.dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(like.dtype).min)


def step_mask(step, mask, sliding_window: Optional[int] = None):
    """The mask for a :class:`lacache_core.step.LayerStep`: ``mask`` itself, or, where the layer's heads differ in
    length, ``mask`` with each head's padding hidden (``[b, heads, q, n]``; bool or additive like ``mask``), or
    the step's own mask (:func:`row_mask`) where rows need it or the layer has a ``sliding_window``: the model
    counts a window from the positions it is given, which ``generate`` advances by the tokens fed while the
    cache holds fewer slots."""
    if step.fillers is not None or sliding_window:
        return row_mask(step, sliding_window)
    lengths = step.lengths  # [kv_heads]: one row
    if lengths is None:
        return mask
    query = step.query
    heads, q = query.shape[1], query.shape[2]
    n = int(lengths.max())
    pad = torch.arange(n)[None, :] < (n - lengths)[:, None]  # [kv_heads, n]: padding slots
    pad = pad.repeat_interleave(heads // lengths.shape[0], 0)[None, :, None, :].to(query.device)
    if q > 1:  # the new tokens' causal block (the last q slots)
        rows = torch.arange(n - q, n, device=query.device)[:, None]
        pad = pad | (torch.arange(n, device=query.device)[None, :] > rows)[None, None]
    if mask is None:
        return hide(~pad, query).expand(query.shape[0], heads, q, n)
    mask = mask[..., -n:] if mask.shape[-1] >= n else mask
    if mask.dtype == torch.bool:
        return mask & ~pad
    return torch.where(pad, torch.finfo(mask.dtype).min, mask)


def row_mask(step, sliding_window: Optional[int] = None) -> torch.Tensor:
    """``[b, 1 | heads, q, n]`` additive: each row's filler slots (and a head's padding, where heads differ in
    length) hidden, the new tokens causal, and with a ``sliding_window`` only the keys fewer than that many
    slots before the query (the model's own mask counts the window in cache slots too). It replaces the
    model's mask, which knows the padding of the input but not where compaction has moved each row's tokens."""
    query = step.query
    b, heads, q, device = *query.shape[:3], query.device
    n = step.n
    first = step.first_slots()  # [b, 1] or [b | 1, kv_heads]
    first = torch.zeros(b, 1, dtype=torch.long) if first is None else first.expand(b, -1)
    if first.shape[-1] > 1:  # heads of different lengths: [b, heads]
        first = first.repeat_interleave(heads // first.shape[-1], -1)
    slots = torch.arange(n, device=device)
    allowed = slots[None, None, None, :] >= first.to(device)[:, :, None, None]  # [b, 1 | heads, 1, n]
    query_slots = torch.arange(n - q, n, device=device)[:, None]
    allowed = allowed & (slots[None, :] <= query_slots)  # [b, ., q, n]
    if sliding_window:
        allowed = allowed & (slots[None, :] > query_slots - sliding_window)
    return hide(allowed, query)

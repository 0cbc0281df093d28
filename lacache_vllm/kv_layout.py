"""Where a slot's key and value lie in an attention backend's paged KV tensor, found by asking the backend.

A layout is a pair of views of one layer's cache tensor, each ``[num_blocks, block_size, kv_heads, head_dim]``
(strided, no copy), so that slot ``s`` of a request is ``view[block_ids[s // block_size], s % block_size]``.
The backends store blocks differently (vLLM's CPU kernel keeps each (block, head) as K transposed,
``[head_dim, block_size]``, then V row-major; FlashAttention keeps ``[2, num_blocks, block_size, heads, dim]``), and
that layout is not a public contract: :func:`probe_layout` writes known keys through the backend's own cache-write
op into a scratch copy and keeps the candidate that reads them back exactly, or refuses.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from lacache_core.errors import ConfigError

Views = Tuple[torch.Tensor, torch.Tensor]


def _blocked_transposed_keys(cache: torch.Tensor, heads: int, dim: int) -> Views:
    """``[num_blocks, heads, block_size, 2 * dim]`` holding, per (block, head), K as ``[dim, block]`` then V."""
    blocks, block = cache.shape[0], cache.shape[2]
    halves = cache.view(blocks, heads, 2, block * dim)
    key = halves[:, :, 0].view(blocks, heads, dim, block).permute(0, 3, 1, 2)
    value = halves[:, :, 1].view(blocks, heads, block, dim).permute(0, 2, 1, 3)
    return key, value


def _blocked_row_major(cache: torch.Tensor, heads: int, dim: int) -> Views:
    """As :func:`_blocked_transposed_keys`, with K row-major (``[block, dim]``) too."""
    blocks, block = cache.shape[0], cache.shape[2]
    halves = cache.view(blocks, heads, 2, block, dim)
    return halves[:, :, 0].permute(0, 2, 1, 3), halves[:, :, 1].permute(0, 2, 1, 3)


def _kv_first(cache: torch.Tensor, heads: int, dim: int) -> Views:
    """``[2, num_blocks, block_size, heads, dim]`` (FlashAttention, Triton)."""
    return cache[0], cache[1]


def _kv_second(cache: torch.Tensor, heads: int, dim: int) -> Views:
    """``[num_blocks, 2, block_size, heads, dim]`` (FlashInfer)."""
    return cache[:, 0], cache[:, 1]


CANDIDATES: Dict[str, Callable[[torch.Tensor, int, int], Views]] = {
    "cpu: K transposed per (block, head), then V": _blocked_transposed_keys,
    "cpu: K then V per (block, head), row-major": _blocked_row_major,
    "[2, blocks, block_size, heads, dim]": _kv_first,
    "[blocks, 2, block_size, heads, dim]": _kv_second,
}


def _fits(views: Views, blocks: int, block: int, heads: int, dim: int) -> bool:
    return all(tuple(v.shape) == (blocks, block, heads, dim) for v in views)


def probe_layout(layer, cache: torch.Tensor, block_size: int, kv_heads: int, head_dim: int) -> str:
    """The name of the :data:`CANDIDATES` layout that ``layer``'s backend writes, checked on a scratch copy.

    Parameters
    ----------
    layer : the engine's attention layer (its ``impl`` has the backend's ``do_kv_cache_update``).
    cache : that layer's KV tensor (only its shape and dtype are used).
    """
    impl = layer.impl
    if not hasattr(impl, "do_kv_cache_update"):
        raise ConfigError(f"kv_compression cannot find where the {type(impl).__name__} attention backend writes keys "
                          "(it has no do_kv_cache_update); supported: vLLM's CPU and FlashAttention backends")
    blocks = 3
    kv_first = cache.dim() == 5 and cache.shape[0] == 2  # [2, num_blocks, ...]: the blocks are the second dim
    scratch = torch.zeros_like(cache[:, :blocks] if kv_first else cache[:blocks])  # keeps the cache's strides
    count = block_size + 3  # crosses a block boundary
    generator = torch.Generator().manual_seed(0)
    key = torch.randn(count, kv_heads, head_dim, generator=generator).to(cache.dtype).to(cache.device)
    value = torch.randn(count, kv_heads, head_dim, generator=generator).to(cache.dtype).to(cache.device)
    slots = torch.arange(block_size - 1, block_size - 1 + count, device=cache.device)  # blocks 0, 1 and 2
    impl.do_kv_cache_update(layer, key, value, scratch, slots)
    for name, views_of in CANDIDATES.items():
        try:
            views = views_of(scratch, kv_heads, head_dim)
        except RuntimeError:
            continue
        if not _fits(views, blocks, block_size, kv_heads, head_dim):
            continue
        got_key = views[0][slots // block_size, slots % block_size]
        got_value = views[1][slots // block_size, slots % block_size]
        if torch.equal(got_key, key) and torch.equal(got_value, value):
            return name
    raise ConfigError(f"kv_compression does not know the KV cache layout of the {type(impl).__name__} backend "
                      f"(cache {tuple(cache.shape)}): none of {list(CANDIDATES)} reads back the keys it wrote")


class SlotAccess:
    """Read and write slots of one layer's paged cache through the probed layout."""

    def __init__(self, layout: str, cache: torch.Tensor, kv_heads: int, head_dim: int):
        self.key, self.value = CANDIDATES[layout](cache, kv_heads, head_dim)
        self.block_size = self.key.shape[1]
        self.kv_heads = kv_heads

    def where(self, blocks: torch.Tensor, slots: torch.Tensor):
        """The index of ``slots`` in the views (the same for every layer of a request: computed once)."""
        where = (blocks[slots // self.block_size], slots % self.block_size)
        if slots.dim() == 2:  # [kv_heads, n]: head h's own slots
            where += (torch.arange(self.kv_heads, device=slots.device)[:, None].expand_as(slots),)
        return where

    def read(self, blocks: torch.Tensor, slots: torch.Tensor) -> Views:
        """Keys and values at ``slots`` of a request whose blocks are ``blocks``.

        ``slots`` ``[n]`` (every head alike) gives ``[n, kv_heads, head_dim]`` each; ``[kv_heads, n]`` (a slot per
        head) gives ``[kv_heads, n, head_dim]``.
        """
        where = self.where(blocks, slots)
        return self.key[where], self.value[where]

    def write(self, blocks: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``key`` and ``value`` (shaped as :meth:`read` returns them) at ``slots``."""
        self.write_at(self.where(blocks, slots), key, value)

    def write_at(self, where, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key[where] = key
        self.value[where] = value


def stacked(accesses) -> "Views | None":
    """One ``[layers, num_blocks, block_size, kv_heads, head_dim]`` view of every layer's keys and one of the values,
    where the engine allocated the layers back to back in one buffer with equal layouts (vLLM does, on the CPU and
    on GPUs), so that a compaction reads and writes every layer in one indexing op; ``None`` otherwise."""
    def stack(views):
        first = views[0]
        if any(v.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or v.shape != first.shape
               or v.stride() != first.stride() for v in views):
            return None
        offsets = [v.storage_offset() for v in views]
        step = offsets[1] - offsets[0] if len(views) > 1 else 0
        if any(b - a != step for a, b in zip(offsets, offsets[1:])):
            return None
        return torch.as_strided(first, (len(views), *first.shape), (step, *first.stride()), offsets[0])

    keys, values = stack([a.key for a in accesses]), stack([a.value for a in accesses])
    return None if keys is None or values is None else (keys, values)

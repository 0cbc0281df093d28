"""Rotary position embedding helpers shared by the position-shift patches."""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Tuple

import torch

RotaryFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[b, heads, n, d]`` by ``cos``/``sin`` of shape ``[n, d]`` or ``[b, n, d]``."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rotary_fn_from_module(rotary: torch.nn.Module) -> RotaryFn:
    """Wrap an HF rotary module as ``fn(x, position_ids [b, m]) -> (cos, sin) [b, m, d]``.

    Newer modules take ``position_ids``; older ones (transformers 4.33, Qwen2 in 4.4x) return a
    table for ``seq_len`` positions that we index ourselves.
    """
    params = inspect.signature(rotary.forward).parameters
    if "position_ids" in params:
        return lambda x, pos: rotary(x, pos)

    def from_table(x, pos):
        cos, sin = rotary(x, seq_len=int(pos.max()) + 1)
        d = cos.shape[-1]
        cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
        return cos[pos], sin[pos]

    return from_table


class RopeTable:
    """``cos``/``sin`` for positions ``0 .. n-1``, computed once by the model's own rotary module.

    Every layer re-rotates all its cached keys at every step, so the table is shared by the
    layers of a model and grown geometrically instead of being recomputed per layer and step.
    Only position-static RoPE variants (default, linear, llama3, yarn) are supported; dynamic
    NTK scaling depends on the sequence length and is not.
    """

    def __init__(self, rotary_fn: RotaryFn):
        self.rotary_fn = rotary_fn
        self._tables: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, n: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[n, d]``, in ``like``'s dtype and device."""
        key = (like.device, like.dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < n:
            size = max(n, 2 * (0 if table is None else table[0].shape[0]), 64)
            probe = torch.zeros(1, device=like.device, dtype=torch.float32)
            pos = torch.arange(size, device=like.device)[None]
            cos, sin = self.rotary_fn(probe, pos)
            table = (cos[0].to(like.dtype), sin[0].to(like.dtype))
            self._tables[key] = table
        return table[0][:n], table[1][:n]

    def at(self, position_ids: torch.Tensor, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` at arbitrary ``position_ids [b, q]``, each ``[b, q, d]``."""
        cos, sin = self.get(int(position_ids.max()) + 1, like)
        return cos[position_ids], sin[position_ids]

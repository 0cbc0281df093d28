"""Rotary position embeddings for the position-shift integrations: tables and rotation with the model's own RoPE."""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional, Tuple

import torch

RotaryFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
        self._tables: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, ...]] = {}

    def get(self, n: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cos, sin, signed sin)``, each ``[m, d]`` for ``m >= n`` positions, in ``like``'s dtype and device.

        The signed copy (:func:`signed`) serves the fast rotate-half path; it is made once per table.
        """
        key = (like.device, like.dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < n:
            size = max(n, 2 * (0 if table is None else table[0].shape[0]), 64)
            probe = torch.zeros(1, device=like.device, dtype=torch.float32)
            pos = torch.arange(size, device=like.device)[None]
            cos, sin = self.rotary_fn(probe, pos)
            cos, sin = cos[0].to(like.dtype), sin[0].to(like.dtype)
            table = (cos, sin, signed(sin))
            self._tables[key] = table
        return table


def standard_apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The rotate-half RoPE of Llama-style models, for models whose code has no module-level function."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half_fast(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in three operations: ``x [b, h, n, r]``, ``cos``/``signed_sin`` ``[b, n, r]``.

    ``signed_sin`` is ``sin`` with its first half negated (:func:`signed`). For tables with equal
    halves this equals ``x * cos + rotate_half(x) * sin`` element for element: the same products
    (a product with ``-s`` is the negated product) and the same sums.
    """
    return x * cos.unsqueeze(1) + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin.unsqueeze(1)


def signed(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with the first half of its last dimension negated."""
    h = sin.shape[-1] // 2
    return torch.cat([-sin[..., :h], sin[..., h:]], -1)


class Rotation:
    """Rotates queries and keys to given positions with a model's own RoPE.

    Parameters
    ----------
    rotary_fn : ``fn(x, position_ids [b, m]) -> (cos, sin) [b, m, r]``, the model's rotary module.
    apply_fn : the model's ``apply_rotary_pos_emb(q, k, cos, sin)``; it fixes the rotation layout
        (rotate-half or interleaved). Partial rotary (``r < head_dim``) rotates the first ``r``
        channels and passes the rest, as every partial-rotary family in transformers does.
    """

    def __init__(self, rotary_fn: RotaryFn, apply_fn=standard_apply):
        self.table = RopeTable(rotary_fn)
        self.apply_fn = apply_fn
        self._fast: Optional[bool] = None
        self._pass = None

    def _for_pass(self, embeddings: Tuple[torch.Tensor, torch.Tensor]) -> dict:
        """Pairs made for one forward pass: every layer of a pass gets the same ``embeddings`` object,
        so what one layer builds from it serves the others."""
        if self._pass is None or self._pass[0] is not embeddings:
            self._pass = (embeddings, {})
        return self._pass[1]

    def identity(self, embeddings: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(1, 0)`` tensors shaped like the model's ``(cos, sin)``: a rotation that leaves q and k as they are."""
        pairs = self._for_pass(embeddings)
        if "identity" not in pairs:
            cos, sin = embeddings
            pairs["identity"] = (torch.ones_like(cos), torch.zeros_like(sin))
        return pairs["identity"]

    def embeddings(self, first: int, like: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` shaped like the model's ``like`` pair, for positions ``first, first + 1, ...``.

        Given to the model's attention in place of its own, they make it rotate its new query and
        keys to positions of our choosing with its own code.
        """
        pairs = self._for_pass(like)
        if first not in pairs:
            cos = like[0]
            q = cos.shape[-2]
            table_cos, table_sin, _ = self.table.get(first + q, cos)
            pairs[first] = tuple(t[first:first + q].expand(cos.shape) for t in (table_cos, table_sin))
        return pairs[first]

    def embeddings_rows(self, first: int, offsets: torch.Tensor,
                        like: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`embeddings`, row ``j`` of the batch at positions ``first - offsets[j], ...`` (a left-padded
        batch: each row counts its own tokens; its pad slots, masked, at position 0)."""
        pairs = self._for_pass(like)
        key = (first, tuple(offsets.tolist()))
        if key not in pairs:
            cos = like[0]
            b, q = cos.shape[0], cos.shape[-2]
            table_cos, table_sin, _ = self.table.get(first + q, cos)
            pos = ((first - offsets.to(table_cos.device))[:, None] + torch.arange(q, device=table_cos.device)).clamp_min(0)
            pairs[key] = tuple(t[pos].view(b, q, -1).expand(cos.shape) for t in (table_cos, table_sin))
        return pairs[key]

    def _is_rotate_half(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Whether the model's function is the rotate-half layout with duplicated frequencies, checked
        once on random inputs: then :func:`rotate_half_fast` gives its results with fewer operations."""
        h = cos.shape[-1] // 2
        if cos.shape[-1] % 2 or not (torch.equal(cos[..., :h], cos[..., h:]) and torch.equal(sin[..., :h], sin[..., h:])):
            return False
        probe = torch.randn(1, 2, cos.shape[-2], cos.shape[-1], generator=torch.Generator().manual_seed(0))
        probe = probe.to(x.device, x.dtype)
        return torch.equal(self.apply_fn(probe, probe, cos, sin)[0], rotate_half_fast(probe, cos, signed(sin)))

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        r = cos.shape[-1]
        part, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
        if self._fast is None:
            self._fast = self._is_rotate_half(part, cos, sin)
        if self._fast:
            out = rotate_half_fast(part, cos, signed_sin)
        else:  # the model's function rotates a (q, k) pair; a one-head slice stands in for the second
            out = self.apply_fn(part, part[:, :1], cos, sin)[0]
        return out if rest is None else torch.cat([out, rest], -1)

    def composes(self, like: torch.Tensor) -> bool:
        """Whether rotating twice equals rotating once by the sum, up to rounding: true when position 0
        is the identity (``cos = 1``, ``sin = 0``), false for tables scaled by an attention factor (YaRN)."""
        cos, sin, _ = self.table.get(1, like)
        return bool((cos[0] == 1).all() and (sin[0] == 0).all())

    def from_slot(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """``x [b, h, n, d]`` rotated to positions ``start .. start + n - 1``."""
        cos, sin, signed_sin = self.table.get(start + x.shape[-2], x)
        end = start + x.shape[-2]
        return self._apply(x, cos[None, start:end], sin[None, start:end], signed_sin[None, start:end])

    def shift(self, x: torch.Tensor, by: int) -> torch.Tensor:
        """``x [b, h, n, d]`` rotated by ``by`` positions more (fewer, if negative), every slot alike."""
        cos, sin, signed_sin = (t[None, abs(by):abs(by) + 1] for t in self.table.get(abs(by) + 1, x))
        return self._apply(x, cos, sin, signed_sin) if by >= 0 else self._apply(x, cos, -sin, -signed_sin)

    def at(self, x: torch.Tensor, positions: torch.Tensor, per_head: bool = False,
           limit: Optional[int] = None, inverse: bool = False) -> torch.Tensor:
        """``x [b, h, n, d]`` rotated to ``positions``: ``[n]`` or ``[b, n]``, or with ``per_head`` ``[h, n]`` or
        ``[b, h, n]`` (per row and head).

        ``limit``: an upper bound on the positions, if the caller knows one (saves reading their maximum
        back from the device). ``inverse``: rotate by ``-positions`` instead (``cos`` is even, ``sin`` odd).
        """
        table = self.table.get(int(positions.max()) + 1 if limit is None else limit, x)
        pos = positions.to(table[0].device)
        if pos.dim() == 1 and not per_head:
            pos = pos[None]
        cos, sin, signed_sin = (t[pos] for t in table)
        if inverse:
            sin, signed_sin = -sin, -signed_sin
        if per_head:
            b, h, n, d = x.shape  # fold the heads into the batch: the model's function broadcasts over heads
            if pos.dim() == 3:
                tables = [t.reshape(b * h, n, -1) for t in (cos, sin, signed_sin)]
            else:
                tables = [t.repeat(b, 1, 1) for t in (cos, sin, signed_sin)]
            return self._apply(x.reshape(b * h, 1, n, d), *tables).reshape(b, h, n, -1)
        return self._apply(x, cos, sin, signed_sin)

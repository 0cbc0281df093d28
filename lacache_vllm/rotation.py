"""Moving a cached key from one position to another with the engine's own rotary embedding.

A key cached at position ``p`` is ``R(p) k``; moved to slot ``q`` it must read ``R(q) k = R(q - p) R(p) k``. The
angles are ``(q - p) * inv_freq`` with the frequencies the engine rotated with, read from its ``cos_sin_cache``
(row 1 holds ``cos(inv_freq), sin(inv_freq)``), so scaled variants (linear, Llama 3, YaRN, ...) move keys as they
rotated them.
"""
from __future__ import annotations

import torch

from lacache_core.errors import ConfigError


class KeyMover:
    """Rotate keys by a per-key position difference.

    Parameters
    ----------
    rotary : the engine's rotary embedding module of the layer (``cos_sin_cache``, ``rotary_dim``,
        ``is_neox_style``).
    """

    def __init__(self, rotary: torch.nn.Module):
        cache = getattr(rotary, "cos_sin_cache", None)
        if cache is None or not hasattr(rotary, "rotary_dim") or "MRotary" in type(rotary).__name__:
            raise ConfigError(f"kv_compression cannot move keys rotated by {type(rotary).__name__}: supported are "
                              "rotary embeddings with one position per token (RoPE and its scaled variants)")
        self.rotary_dim = rotary.rotary_dim
        self.neox = bool(rotary.is_neox_style)
        cos, sin = cache[1].float().chunk(2, dim=-1)
        self.inv_freq = torch.atan2(sin, cos)  # exact in (0, pi): every RoPE frequency is at most 1 radian per token
        inv_freq = getattr(rotary, "_compute_inv_freq", None)
        try:  # the frequencies the cache was built from, where the module still computes them the same way
            exact = inv_freq(rotary.base).float().to(self.inv_freq.device)
            if exact.shape == self.inv_freq.shape and torch.allclose(exact, self.inv_freq, rtol=1e-4, atol=1e-6):
                self.inv_freq = exact
        except Exception:  # noqa: BLE001 - a subclass with another signature: the angles read back stand
            pass

    def turn(self, by: torch.Tensor):
        """``(cos, sin)`` of a rotation by ``by`` positions (new position minus old): ``[n, 1, rotary_dim / 2]`` for
        ``by`` ``[n]`` (every head alike), ``[heads, n, rotary_dim / 2]`` for ``by`` ``[heads, n]``; computed once for
        every layer that moves the same slots."""
        by = by.to(self.inv_freq.device, torch.float32)
        angle = (by[:, None] if by.dim() == 1 else by)[..., None] * self.inv_freq
        return angle.cos(), angle.sin()

    def apply(self, key: torch.Tensor, turn) -> torch.Tensor:
        """``key`` (``[n, heads, head_dim]``, or ``[heads, n, head_dim]``) rotated by :meth:`turn`'s rotation."""
        cos, sin = turn
        rot, rest = key[..., :self.rotary_dim].float(), key[..., self.rotary_dim:]
        if self.neox:
            first, second = rot.chunk(2, dim=-1)
        else:
            first, second = rot[..., 0::2], rot[..., 1::2]
        new_first, new_second = first * cos - second * sin, second * cos + first * sin
        if self.neox:
            moved = torch.cat([new_first, new_second], dim=-1)
        else:
            moved = torch.stack([new_first, new_second], dim=-1).flatten(-2)
        return torch.cat([moved.to(key.dtype), rest], dim=-1)

    def move(self, key: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        """``key`` rotated by ``by`` positions: ``[n, heads, head_dim]`` with ``by`` ``[n]``, or
        ``[heads, n, head_dim]`` with ``by`` ``[heads, n]``."""
        return self.apply(key, self.turn(by))

"""KIVI on the schedule of its own code, for a cache that keeps every token (``--quant_schedule reference``).

Reference: github.com/jy-yuan/KIVI @ 876b4d2, ``models/llama_kivi.py`` (its Llama attention, prefill and decode
branches) and ``quant/new_pack.py`` (``triton_quantize_and_pack_along_last_dim``). That code quantizes a token's
key and its value at different times:

- **keys**: the full-precision residual grows until it holds ``residual`` keys; then all of them are quantized
  at once, per channel, in blocks of ``group`` tokens. The prompt leaves its last ``n % residual`` keys whole.
  Between steps the residual holds 0 to ``residual - 1`` keys.
- **values**: the newest ``residual`` stay whole; each older one is quantized on its own, per token in groups
  of ``group`` channels. The prompt leaves its last ``residual`` values whole.

:class:`lacache_core.quant.KIVIStore` (``--quant_schedule block``, the default) quantizes a key and its value
together, a block of ``group`` tokens at a time once more than ``residual`` are whole, so that eviction can
move a token's codes as one. Its blocks are the same tokens as the reference's (both start at token 0) and its
arithmetic is the same; only when a token is quantized differs. This store keeps the reference's timing, and
so holds keys and values split at different points: no method may evict, merge or prune from it.

Where we still differ:
- a block whose channel is constant gets codes 0 and is exact (the reference divides by a zero scale);
- min, scale and codes are computed in float32 (the reference: in the model's dtype, so in float16 about 0.1% of
  codes land one step apart);
- codes are packed along channels rather than along tokens, which holds the same bytes;
- a prompt fed in chunks (``--prefill_chunk_size``) ends in the state of the whole prompt at once (the
  reference's decode branch takes one token at a time);
- the reference quantizes keys after RoPE: ``key_order="post_rope"`` reproduces it; the default, before RoPE,
  keeps only its timing.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .errors import ConfigError
from .quant import QuantizedStore, pack, quantize, unpack


class KIVIReferenceStore(QuantizedStore):
    """One layer's keys and values under :class:`lacache_core.quantizers.KIVI` with ``schedule="reference"``.

    Held: ``key_codes`` (packed, ``[b, h, m_k, d * bits / 8]``) with each key block's per-channel ``key_low``
    and ``key_scale`` (``[b, h, m_k / group, d]``); ``value_codes`` (``[b, h, m_v, d * bits / 8]``) with
    per-token, per-group ``value_low`` and ``value_scale`` (``[b, h, m_v, d / group]``); and the whole keys
    (``[b, h, n - m_k, d]``) and values (``[b, h, n - m_v, d]``). Keys are as the cache stores them: before
    RoPE, or rotated (``key_order="post_rope"``, as the reference holds them).
    """

    FIELDS = ("key_codes", "key_low", "key_scale", "value_codes", "value_low", "value_scale", "key", "value")

    def __init__(self, config: KIVI, key: torch.Tensor, value: torch.Tensor):
        b, h, _, d = key.shape
        if d % config.group:
            raise ConfigError(f"{type(config).__name__}.group {config.group} must divide head_dim {d}")
        self.config, self.dtype = config, key.dtype
        codes = torch.zeros(b, h, 0, d * config.bits // 8, dtype=torch.uint8, device=key.device)
        self.key_codes, self.value_codes = codes, codes.clone()
        self.key_low, self.key_scale = key.new_zeros(b, h, 0, d), key.new_zeros(b, h, 0, d)
        self.value_low = key.new_zeros(b, h, 0, d // config.group)
        self.value_scale = self.value_low.clone()
        self.key, self.value = key, value

    def append(self, key, value):
        self.key, self.value = torch.cat([self.key, key], -2), torch.cat([self.value, value], -2)

    def compress(self) -> None:
        """End of a step: the residual's keys in blocks once it holds ``residual`` of them, and every value older
        than the newest ``residual``, as the reference's prefill and decode branches do."""
        c = self.config
        b, h, r, d = self.key.shape
        ready = r // c.residual * c.residual
        if ready:
            blocks = self.key[:, :, :ready].float().view(b, h, ready // c.group, c.group, d)
            codes, low, scale = quantize(blocks, c.bits, dim=3)
            self.key_codes = torch.cat([self.key_codes, pack(codes.view(b, h, ready, d), c.bits)], 2)
            self.key_low = torch.cat([self.key_low, low[:, :, :, 0].to(self.dtype)], 2)
            self.key_scale = torch.cat([self.key_scale, scale[:, :, :, 0].to(self.dtype)], 2)
            self.key = self.key[:, :, ready:].clone()  # not a view that keeps the quantized keys alive
        old = self.value.shape[2] - c.residual
        if old > 0:
            quantized = self._quantized_values(self.value[:, :, :old])  # codes, min, scale
            for name, new in zip(("value_codes", "value_low", "value_scale"), quantized):
                setattr(self, name, torch.cat([getattr(self, name), new], 2))
            self.value = self.value[:, :, old:].clone()

    def dequantized(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The quantized keys (``[b, h, m_k, d]``) and values (``[b, h, m_v, d]``), dequantized."""
        c, (b, h, _, d), m = self.config, self.key.shape, self.key_codes.shape[2]
        keys = unpack(self.key_codes, c.bits, d).to(self.dtype).view(b, h, m // c.group, c.group, d)
        keys = keys * self.key_scale[:, :, :, None] + self.key_low[:, :, :, None]
        return keys.view(b, h, m, d), self._dequantized_values()

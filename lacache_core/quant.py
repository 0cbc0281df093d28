"""KIVI-style KV quantization (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", arXiv 2402.02750; reference code github.com/jy-yuan/KIVI).

Keys are quantized per channel, values per token, both asymmetric (min and scale per group) at 2, 4 or 8
bits, and the newest tokens stay in full precision (the residual). A key block is ``group`` tokens: each
channel of the block has its own min and scale. A value is cut into groups of ``group`` channels, each
with its own min and scale. Codes are bit-packed, so the bytes counted are the bytes held.

Eviction runs on the quantized form: a kept token keeps its codes, and its key block's min and scale
(each token carries the index of its block), so nothing is dequantized and quantized again. Keys are
quantized before RoPE (KVQuant's finding, Hooper et al. 2024: pre-RoPE keys have the clean per-channel
outliers that per-channel quantization needs), and the cache rotates the dequantized keys to their
positions at every step.

This module holds the stores; the hyper-parameters are :class:`lacache_core.quantizers.KIVI`, which imports
this module (never the other way round).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .errors import ConfigError
from .per_head_quant import PerHeadQuantStore  # noqa: F401  (KIVIStore.keep builds it; imported from here too)
from .storage import LayerStore, RowStores, _bytes

# ``KIVI`` in annotations is lacache_core.quantizers.KIVI, not imported: it imports this module


def quantize(x: torch.Tensor, bits: int, dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of ``x`` with one min and scale per slice along ``dim``.

    Returns ``(codes, low, scale)``: integer codes in ``[0, 2**bits - 1]`` (uint8, the shape of ``x``),
    and ``low``, ``scale`` with ``dim`` reduced to size 1. ``low + codes * scale`` is within ``scale / 2``
    of ``x`` everywhere.
    """
    low = x.amin(dim, keepdim=True)
    scale = (x.amax(dim, keepdim=True) - low) / (2 ** bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant slice: codes 0, exact
    codes = ((x - low) / scale).round_().clamp_(0, 2 ** bits - 1).to(torch.uint8)
    return codes, low, scale


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., d]`` uint8 codes of ``bits`` bits into ``[..., ceil(d * bits / 8)]`` bytes (``8 / bits`` per byte;
    the last byte zero-filled where ``d`` is not a multiple of ``8 / bits``)."""
    per = 8 // bits
    codes = torch.nn.functional.pad(codes, (0, -codes.shape[-1] % per))
    codes = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, width: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., width]`` codes (``width``: the ``d`` packed; every code if ``None``)."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    codes = ((packed[..., None] >> shifts) & (2 ** bits - 1)).flatten(-2)
    return codes if width is None else codes[..., :width]


class QuantizedStore(LayerStore):
    """What every quantized layer store shares: its tensors, named in :attr:`FIELDS` (and :attr:`OPTIONAL_FIELDS`
    where set), are its bytes and its checkpoint, and ``self.key`` holds its newest keys whole."""

    FIELDS: Tuple[str, ...] = ()
    OPTIONAL_FIELDS: Tuple[str, ...] = ()

    def dequantized(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The quantized tokens' keys and values, dequantized (``[b, h, m, d]`` each; the keys' ``m`` may differ)."""
        raise NotImplementedError

    def view(self):
        keys, values = self.dequantized()
        return torch.cat([keys, self.key], -2), torch.cat([values, self.value], -2)

    def shape(self):
        b, h, r, _ = self.key.shape
        return b, h, self.key_codes.shape[2] + r

    def _quantized_values(self, value):
        """Per token, each group of ``group`` channels: ``(packed codes, min, scale)`` of ``value`` ``[b, h, n, d]``."""
        c, (b, h, n, d) = self.config, value.shape
        codes, low, scale = quantize(value.float().view(b, h, n, d // c.group, c.group), c.bits, dim=-1)
        return pack(codes.view(b, h, n, d), c.bits), low[..., 0].to(self.dtype), scale[..., 0].to(self.dtype)

    def _dequantized_values(self) -> torch.Tensor:
        """``value_codes`` with their per-token, per-group ``value_low`` and ``value_scale``: ``[b, h, m, d]``."""
        c, d = self.config, self.value.shape[-1]
        b, h, m, _ = self.value_codes.shape
        codes = unpack(self.value_codes, c.bits, d).to(self.dtype).view(b, h, m, d // c.group, c.group)
        return (codes * self.value_scale[..., None] + self.value_low[..., None]).view(b, h, m, d)

    def nbytes(self):
        return _bytes(*(getattr(self, name) for name in self.FIELDS), *self._optional_state().values())

    def write_newest_keys(self, rotated):
        """Post-RoPE keys: the newest keys, rotated (they are whole until the step ends)."""
        if self.config.key_order != "post_rope":
            raise RuntimeError("quantized keys are stored before RoPE; the cache rotates them at every step")
        self.key[..., self.key.shape[-2] - rotated.shape[-2]:, :] = rotated

    # checkpoints: the tensors as held (a restore must not quantize dequantized values again)
    def state(self) -> dict:
        return {**{name: getattr(self, name) for name in self.FIELDS}, **self._optional_state()}

    def _optional_state(self) -> dict:
        return {name: getattr(self, name) for name in self.OPTIONAL_FIELDS if getattr(self, name) is not None}

    @classmethod
    def from_state(cls, config: KIVI, state: dict) -> "QuantizedStore":
        store = cls.__new__(cls)
        store.config, store.dtype = config, state["key"].dtype
        for name in cls.FIELDS:
            setattr(store, name, state[name])
        for name in cls.OPTIONAL_FIELDS:
            setattr(store, name, state.get(name))
        return store


class KIVIStore(QuantizedStore):
    """One layer's keys (un-rotated) and values under :class:`KIVI`.

    Held: the quantized older tokens (packed key codes ``[b, h, m, d * bits / 8]`` with each token's key
    block ``[b, h, m]``, and the blocks' per-channel min and scale ``[b, h, blocks, d]``; packed value codes
    with per-token, per-group min and scale ``[b, h, m, d / group]``) and the full-precision residual
    ``[b, h, r, d]``. :meth:`view` dequantizes the older tokens for one step.
    """

    def __init__(self, config: KIVI, key: torch.Tensor, value: torch.Tensor):
        b, h, _, d = key.shape
        if d % config.group:
            raise ConfigError(f"{type(config).__name__}.group {config.group} must divide head_dim {d}")
        self.config, self.dtype = config, key.dtype
        empty = key.new_zeros(b, h, 0, d)
        self.key_codes = torch.zeros(b, h, 0, d * config.bits // 8, dtype=torch.uint8, device=key.device)
        self.value_codes = self.key_codes.clone()
        self.key_block = torch.zeros(b, h, 0, dtype=torch.int32, device=key.device)  # each token's key block
        self.key_low, self.key_scale = empty.clone(), empty.clone()  # [b, h, blocks, d]
        self.value_low = key.new_zeros(b, h, 0, d // config.group)
        self.value_scale = self.value_low.clone()
        self.key, self.value = empty, value.new_zeros(b, h, 0, d)  # the residual
        self.channels: Optional[torch.Tensor] = None  # [h, d_keep]: the key channels quantized keys keep (ThinK)
        # quantized tokens whose values were rewritten (CaM), held whole over their codes until evicted: per row and
        # head, their slots among the quantized tokens ([b, h, z] int32; -1 where a row or head has fewer) and values
        self.whole_slot: Optional[torch.Tensor] = None
        self.whole_value: Optional[torch.Tensor] = None
        self.append(key, value)

    #: per quantized token (``[b, h, m, ...]``, gathered on eviction) and per key block (``[b, h, blocks, ...]``)
    TOKEN_FIELDS = ("key_codes", "value_codes", "value_low", "value_scale")
    BLOCK_FIELDS = ("key_low", "key_scale")
    #: per key block, one entry per key channel held (``d_keep`` after :meth:`prune_channels`)
    KEY_CHANNEL_FIELDS = ("key_low", "key_scale")

    def keep(self, keep):
        if isinstance(keep, list):  # AdaKV, HeadKV: a store per head
            return PerHeadQuantStore.from_store(self, keep)
        if keep is not None:
            self.gather(keep)
        return self

    @property
    def prunable(self) -> bool:
        return self.channels is None and not self.key_codes.shape[2]

    def prune_channels(self, channels: torch.Tensor, whole=None) -> "KIVIStore":
        """Quantize only ``channels`` (``LongTensor [h, d_keep]``, increasing) of every key from now on; the
        others read as zeros. ThinK under quantization, as ThinK's own KIVI code prunes: the keys in the
        full-precision residual keep every channel, and each key loses the others as it is quantized, so
        ``whole`` has no effect here. Called before any key is quantized, so no key is quantized at two widths."""
        if self.key_codes.shape[2]:
            raise RuntimeError("key channels are chosen before any key is quantized")
        self.channels = channels.to(self.key.device)
        width = channels.shape[-1]
        b, h = self.key.shape[:2]
        self.key_codes = self.key_codes.new_zeros(b, h, 0, -(-width * self.config.bits // 8))
        for name in self.KEY_CHANNEL_FIELDS:
            held = getattr(self, name)
            setattr(self, name, held.new_zeros(*held.shape[:-1], width))
        return self

    def _kept_channels(self, key: torch.Tensor) -> torch.Tensor:
        if self.channels is None:
            return key
        b, h, n, _ = key.shape
        return key.gather(-1, self.channels[None, :, None, :].expand(b, h, n, -1))

    # -- adding tokens: the residual grows; after the step, past ``residual`` tokens its oldest ``group`` are
    # quantized (so the tokens of a step attend in full precision, as in KIVI)
    def append(self, key, value):
        self.key, self.value = torch.cat([self.key, key], -2), torch.cat([self.value, value], -2)

    def compress(self) -> None:
        """End of a step: quantize the residual's oldest ``group`` tokens, as one key block, while it holds more
        than ``residual``."""
        g = self.config.group
        while self.key.shape[-2] > self.config.residual and self.key.shape[-2] >= g:
            k, v = self.key[:, :, :g], self.value[:, :, :g]
            self.key, self.value = self.key[:, :, g:], self.value[:, :, g:]
            self._add_quantized(k, v, torch.ones(k.shape[:3], dtype=torch.bool, device=k.device))

    def _add_quantized(self, key, value, block, codes_only=False):
        """Quantize ``key``, ``value`` (``[b, h, n, d]``) as one new key block over the tokens where ``block``
        (``[b, h, n]`` bool) is set. The block's own tensors (:attr:`BLOCK_FIELDS`) are appended; the tokens'
        (:attr:`TOKEN_FIELDS`, in that order) and the block id are returned when ``codes_only``, else appended."""
        tokens, blocks = self._quantize_block(self._kept_channels(key), value, block)
        block_id = self.key_low.shape[2]
        for name, new in zip(self.BLOCK_FIELDS, blocks):
            setattr(self, name, torch.cat([getattr(self, name), new], 2))
        if codes_only:
            return (*tokens, block_id)
        for name, new in zip(self.TOKEN_FIELDS, tokens):
            setattr(self, name, torch.cat([getattr(self, name), new], 2))
        b, h, n, _ = key.shape
        self.key_block = torch.cat([self.key_block, self.key_block.new_full((b, h, n), block_id)], 2)
        return None

    def _quantize_block(self, key, value, block):
        """One new block's ``(token tensors, block tensors)``, as :attr:`TOKEN_FIELDS` and :attr:`BLOCK_FIELDS`
        (``key``: its kept channels only)."""
        c = self.config
        k = key.float()
        big = torch.finfo(torch.float32).max
        low = torch.where(block[..., None], k, big).amin(2, keepdim=True)
        high = torch.where(block[..., None], k, -big).amax(2, keepdim=True)
        any_token = block.any(2)[..., None, None]
        low, high = torch.where(any_token, low, 0.0), torch.where(any_token, high, 0.0)
        scale = (high - low) / (2 ** c.bits - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        key_codes = pack(((k - low) / scale).round_().clamp_(0, 2 ** c.bits - 1).to(torch.uint8), c.bits)
        return (key_codes, *self._quantized_values(value)), (low.to(self.dtype), scale.to(self.dtype))

    def rewrite_values(self, values: torch.Tensor, changed: torch.Tensor) -> None:
        """Replace the values of the tokens ``changed`` (``[b, h, n]`` bool over :meth:`view`'s slots) by theirs in
        ``values`` (``[b, h, n, d]``). CaM's merge under quantization: a quantized token's new value is held whole,
        over its codes, until the token is evicted, so no value is quantized twice (CaM merges into a token up to
        ``merge_budget`` times); a residual token's is written in place."""
        m = self.value_codes.shape[2]
        self._hold_whole(changed[..., :m] | self._whole_mask(m), values[:, :, :m])
        self.value = torch.where(changed[..., m:, None], values[:, :, m:].to(self.value.dtype), self.value)

    def _whole_mask(self, m: int) -> torch.Tensor:
        """``[b, h, m]`` bool: the quantized tokens whose values are held whole."""
        b, h = self.value_codes.shape[:2]
        mask = torch.zeros(b, h, m + 1, dtype=torch.bool, device=self.value.device)
        if self.whole_slot is not None:
            mask.scatter_(2, self._whole_index(m), True)
        return mask[..., :m]

    def _whole_index(self, m: int) -> torch.Tensor:
        """:attr:`whole_slot` with the unused entries at slot ``m`` (a slot past the quantized tokens)."""
        return torch.where(self.whole_slot >= 0, self.whole_slot, m).long()

    def _hold_whole(self, members: torch.Tensor, values: torch.Tensor) -> None:
        """Hold ``values`` (``[b, h, m, d]``) whole at the quantized tokens ``members`` (``[b, h, m]`` bool) only."""
        z = int(members.sum(-1).max()) if members.numel() else 0
        if not z:
            self.whole_slot = self.whole_value = None
            return
        order = torch.argsort((~members).to(torch.int8), dim=2, stable=True)[..., :z]
        held = members.gather(2, order)
        self.whole_slot = torch.where(held, order, -1).to(torch.int32)
        self.whole_value = values.gather(2, order[..., None].expand(*order.shape, values.shape[-1])) * held[..., None]

    def _with_whole(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (``[b, h, m, d]``, as dequantized) with the values held whole put over theirs."""
        if self.whole_slot is None:
            return values
        b, h, m, d = values.shape
        padded = torch.cat([values, values.new_zeros(b, h, 1, d)], 2)  # slot m takes the unused entries
        index = self._whole_index(m)[..., None].expand(*self.whole_slot.shape, d)
        return padded.scatter(2, index, self.whole_value.to(values.dtype))[:, :, :m]

    # -- reading
    def dequantized(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The older tokens' keys and values, dequantized: ``[b, h, m, d]`` each (pruned key channels: zeros)."""
        keys, values = self._decoded()
        values = self._with_whole(values)
        if self.channels is None:
            return keys, values
        b, h, m, _ = keys.shape
        index = self.channels[None, :, None, :].expand(b, h, m, -1)
        return keys.new_zeros(b, h, m, self.key.shape[-1]).scatter_(-1, index, keys), values

    def _decoded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The older tokens' keys (``[b, h, m, channels held]``) and values (``[b, h, m, d]``), dequantized."""
        c = self.config
        b, h, m, _ = self.value_codes.shape
        width = self.key_low.shape[-1]
        block = self.key_block.long()[..., None].expand(b, h, m, width)
        keys = unpack(self.key_codes, c.bits, width).to(self.dtype) * self.key_scale.gather(2, block) \
            + self.key_low.gather(2, block)
        return keys, self._dequantized_values()

    FIELDS = ("key_codes", "value_codes", "key_block", "key_low", "key_scale", "value_low", "value_scale", "key", "value")
    OPTIONAL_FIELDS = ("channels", "whole_slot", "whole_value")

    # -- eviction on the quantized form
    def gather(self, keep: torch.Tensor) -> None:
        """Keep slots ``keep``: ``LongTensor [n_keep]``, ``[h, n_keep]`` or ``[b, h, n_keep]``, increasing.

        Kept quantized tokens keep their codes and key blocks. Where a row or head keeps fewer quantized
        tokens than another, its first kept residual tokens fill the gap: they are quantized now (a key
        block of their own), never dequantized ones quantized again.
        """
        b, h, m, _ = self.key_codes.shape
        idx = keep.to(self.key.device)
        idx = idx.expand(b, h, idx.shape[-1]) if idx.dim() < 3 else idx
        old_count = (idx < m).sum(-1)  # [b, h]
        mq = int(old_count.max()) if idx.shape[-1] else 0
        front = idx[..., :mq]
        early = torch.arange(mq, device=idx.device) >= old_count[..., None]  # [b, h, mq]: residual tokens

        def take(t, index):  # along dim 2, whatever trails it
            at = index.view(*index.shape, *(1,) * (t.dim() - 3))
            return t.gather(2, at.expand(*index.shape, *t.shape[3:]))

        def where(mask, fresh, kept):
            return torch.where(mask.view(*mask.shape, *(1,) * (kept.dim() - 3)), fresh, kept)

        at_old = front.clamp(max=max(m - 1, 0))
        if self.whole_slot is not None:  # values held whole move with their tokens (a residual filler holds none)
            d = self.value.shape[-1]
            whole = self._with_whole(torch.zeros(b, h, m, d, dtype=self.value.dtype, device=idx.device))
            self._hold_whole(self._whole_mask(m).gather(2, at_old) & ~early,
                             whole.gather(2, at_old[..., None].expand(b, h, mq, d)))
        parts = [take(getattr(self, name), at_old) if m else getattr(self, name).new_zeros(
                 b, h, mq, *getattr(self, name).shape[3:]) for name in self.TOKEN_FIELDS]
        block = self.key_block.long().gather(2, at_old) if m else idx.new_zeros(b, h, mq)
        if bool(early.any()):
            at_new = (front - m).clamp(min=0)
            *new, block_id = self._add_quantized(take(self.key, at_new), take(self.value, at_new), early, codes_only=True)
            parts = [where(early, fresh, kept) for fresh, kept in zip(new, parts)]
            block = torch.where(early, block_id, block)
        for name, part in zip(self.TOKEN_FIELDS, parts):
            setattr(self, name, part)
        rest = idx[..., mq:] - m
        self.key, self.value = take(self.key, rest), take(self.value, rest)
        # drop the key blocks no kept token uses, per row and head
        blocks = self.key_low.shape[2]
        if not blocks:
            return
        used = torch.zeros(b, h, blocks, dtype=torch.bool, device=idx.device).scatter_(2, block, True)
        order = torch.argsort((~used).to(torch.int8), dim=2, stable=True)[..., :int(used.sum(-1).max())]
        self.key_block = (used.long().cumsum(2) - 1).gather(2, block).to(torch.int32)
        for name in self.BLOCK_FIELDS:
            setattr(self, name, take(getattr(self, name), order))


def store_from_state(config: KIVI, state: dict) -> LayerStore:
    """A quantized layer as its ``state()`` saved it: one store, or a batch's :class:`RowStores` of them."""
    def one(saved: dict) -> LayerStore:
        return config.store_from_state(saved)

    return RowStores.from_state(state, one) if next(iter(state)).startswith("row") else one(state)

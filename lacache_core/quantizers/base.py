"""What every quantizer shares: a :class:`lacache_core.params.Setting` whose layers are held in a store of its own."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..params import Setting
from ..storage import LayerStore


@dataclass(frozen=True)
class Quantizer(Setting):
    """A KV quantization, passed as ``make_cache(..., quant=...)``: each layer is held in :meth:`new_store`.

    The cache reads :attr:`key_order` and :attr:`schedule` (a field of that name overrides them): keys quantized
    before RoPE and rotated at every step, and a store that eviction can gather from.
    """

    name: ClassVar[str] = "quantizer"
    #: Its flags are ``--quant_<field>`` (a field's ``param(flag_name=...)`` aside).
    flag_prefix: ClassVar[str] = "quant_"
    key_order = "pre_rope"
    schedule = "block"

    @property
    def store_class(self) -> type:
        """The :class:`lacache_core.storage.LayerStore` a layer is held in (built as ``store_class(self, key, value)``)."""
        raise NotImplementedError

    def new_store(self, key: torch.Tensor, value: torch.Tensor) -> LayerStore:
        """A layer's store holding ``key`` and ``value`` (``[b, kv_heads, n, d]`` each; keys as the cache stores them)."""
        return self.store_class(self, key, value)

    def store_from_state(self, state: dict) -> LayerStore:
        """A layer's store as its ``state()`` saved it (the tensors as held, nothing quantized again)."""
        return self.store_class.from_state(self, state)

"""KIVI's hyper-parameters (Liu et al. 2024, arXiv 2402.02750); its stores are :mod:`lacache_core.quant` and
:mod:`lacache_core.kivi_reference`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..errors import ConfigError
from ..kivi_reference import KIVIReferenceStore
from ..params import param
from ..quant import KIVIStore
from .base import Quantizer


@dataclass(frozen=True)
class KIVI(Quantizer):
    """KIVI (Liu et al. 2024): keys per channel before RoPE, values per token, asymmetric, grouped; newest tokens in
    full precision.

    Parameters
    ----------
    bits : int
        Bits per code: 2, 4 or 8 (KIVI's paper: 2 and 4).
    group : int
        Tokens per key block (per-channel min and scale), and channels per value group (per-token min and
        scale). It must divide ``head_dim``.
    residual : int
        Newest tokens kept in full precision (KIVI's ``R``; a multiple of ``group``). Once more than
        ``residual`` are held, the oldest ``group`` of them are quantized as one key block.
    key_order : {"pre_rope", "post_rope"}
        Quantize keys before RoPE (KVQuant's finding, the default; the cache rotates the dequantized keys at
        every step) or after it, as KIVI's code does (keys stored rotated at their original positions; a
        method that moves kept keys to other slots, such as LaCache, would need them dequantized and
        rotated again, so it is refused).
    schedule : {"block", "reference"}
        When tokens are quantized. ``"block"`` (the default): a key and its value together, the residual's oldest
        ``group`` once it holds more than ``residual``, so eviction moves a token's codes as one. ``"reference"``:
        KIVI's code's own timing, keys ``residual`` at a time once that many are whole and values one at a time
        past the newest ``residual`` (:mod:`lacache_core.kivi_reference`; ``method="full"`` only).
    """

    name: ClassVar[str] = "kivi"

    bits: int = param(2)
    group: int = param(32, low=1)
    residual: int = param(128)
    key_order: Literal["pre_rope", "post_rope"] = param("pre_rope", added_later=True)
    schedule: Literal["block", "reference"] = param("block", added_later=True)

    def check(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ConfigError(f"{self._own('bits')} must be 2, 4 or 8, got {self.bits}")
        if self.residual < 0 or self.residual % self.group:
            raise ConfigError(f"{self._own('residual')} must be a multiple of {self._own('group')} {self.group} (>= 0), "
                              f"got {self.residual}")
        if self.schedule == "reference" and self.residual < self.group:
            raise ConfigError(f"{self._own('schedule')} reference quantizes keys {self._own('residual')} at a time: "
                              f"{self._own('residual')} must be at least {self._own('group')} {self.group}, "
                              f"got {self.residual}")

    def _own(self, field: str) -> str:
        """``field``'s setting name on this class (``GEAR.bits`` for a GEAR)."""
        return f"{type(self).__name__}.{field}"

    @property
    def store_class(self) -> type:
        """:class:`lacache_core.quant.KIVIStore`, or KIVI's own schedule's store (subclasses name their own)."""
        return KIVIReferenceStore if self.schedule == "reference" else KIVIStore

    def label(self) -> str:
        """``kivi2``, then ``g{group}r{residual}`` where either differs from the default, ``_postrope``,
        ``_refschedule`` (the folder names results were recorded under)."""
        return self.name + str(self.bits) + self._suffix()

    def _suffix(self) -> str:
        default = KIVI()
        sizes = "" if (self.group, self.residual) == (default.group, default.residual) else \
            f"g{self.group}r{self.residual}"
        return sizes + ("_postrope" if self.key_order == "post_rope" else "") + \
            ("_refschedule" if self.schedule == "reference" else "")

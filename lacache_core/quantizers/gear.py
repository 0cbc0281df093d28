"""GEAR-L's hyper-parameters (Kang et al. 2024, arXiv 2403.05527) on the KIVI backbone; its store is
:mod:`lacache_core.gear`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..gear import GEARStore
from ..params import param
from .kivi import KIVI


@dataclass(frozen=True)
class GEAR(KIVI):
    """GEAR-L (Kang et al. 2024): KIVI plus a low-rank approximation of each block's quantization error.

    :class:`lacache_core.quantizers.kivi.KIVI`'s hyper-parameters, and

    Parameters
    ----------
    rank : int
        Rank of the low-rank approximation of each block's quantization error, per head, for keys and
        values (the reference's decode rank, 2, by default); 1 to ``group``.
    """

    name: ClassVar[str] = "gear"

    rank: int = param(2)

    def check(self) -> None:
        super().check()
        if self.schedule != "block":
            raise ConfigError(f"GEAR.schedule {self.schedule} is KIVI's alone: make_cache.quant gear takes "
                              f"GEAR.schedule block")
        if not 1 <= self.rank <= self.group:
            raise ConfigError(f"GEAR.rank must be between 1 and GEAR.group {self.group}, got {self.rank}")

    @property
    def store_class(self) -> type:
        return GEARStore

    def label(self) -> str:
        """``gear2rank2``, then KIVI's suffixes."""
        return f"{self.name}{self.bits}rank{self.rank}" + self._suffix()

"""The store of a MiniCache pair (:mod:`lacache_core.policies.minicache`): two adjacent layers' keys and values
merged into one shared direction, held once, each layer read through a :class:`MergedLayerStore` of its own."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .storage import DenseStore, LayerStore, Pair, _bytes


class MergedPair:
    """Two adjacent layers' keys and values after MiniCache's merge (:mod:`lacache_core.policies.minicache`).

    Held once for both layers; each layer reads it through its own :class:`MergedLayerStore`.

    Parameters
    ----------
    directions : the unit directions shared by both layers, keys and values (``[b, kv_heads, n, d]`` each), in a
        store: :class:`DenseStore`, or a quantized one (``--quant``).
    key_norms, value_norms : per layer (``[0]`` the earlier, ``[1]`` the later), ``[b, kv_heads, n]``, each
        token's own magnitude.
    retained : ``LongTensor [b, kv_heads, r]``, the slots kept unmerged (increasing), the same for keys and values.
    retained_keys, retained_values : per layer, ``[b, kv_heads, r, d]``, those slots' exact keys and values.
    tail_store : makes the store of the tokens a layer appends after the merge, each layer's own, from the first
        of them (``(key, value) -> LayerStore``; :class:`DenseStore` by default): :attr:`tails`.
    """

    def __init__(self, directions: LayerStore, key_norms, value_norms, retained, retained_keys, retained_values,
                 tail_store: Optional[Callable[[torch.Tensor, torch.Tensor], LayerStore]] = None):
        self.directions = directions
        self.key_norms, self.value_norms = tuple(key_norms), tuple(value_norms)
        self.retained = retained
        self.retained_keys, self.retained_values = tuple(retained_keys), tuple(retained_values)
        self.tail_store = tail_store or DenseStore
        self.tails: List[Optional[LayerStore]] = [None, None]

    @property
    def key_direction(self) -> torch.Tensor:
        return self.directions.view()[0]

    @property
    def value_direction(self) -> torch.Tensor:
        return self.directions.view()[1]

    def merged_slots(self) -> int:
        return self.directions.shape()[2]

    def restore(self, layer: int) -> Pair:
        """Layer ``layer`` (0 or 1) of the merged slots: shared direction times its magnitudes, its retained
        slots put back; ``(key, value)``, each ``[b, kv_heads, n, d]``."""
        key_direction, value_direction = self.directions.view()
        return (_restore(key_direction, self.key_norms[layer], self.retained, self.retained_keys[layer]),
                _restore(value_direction, self.value_norms[layer], self.retained, self.retained_values[layer]))

    def shared_bytes(self) -> int:
        return self.directions.nbytes() + _bytes(self.retained)

    def own_bytes(self, layer: int) -> int:
        tail = self.tails[layer]
        return _bytes(self.key_norms[layer], self.value_norms[layer], self.retained_keys[layer],
                      self.retained_values[layer]) + (0 if tail is None else tail.nbytes())


def _restore(direction: torch.Tensor, norm: torch.Tensor, index: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    unit = direction.float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # re-normalised, as the reference restores
    out = (unit * norm.float()[..., None]).to(direction.dtype)
    return out.scatter(2, index[..., None].expand(*index.shape, out.shape[-1]), exact)


class MergedLayerStore(LayerStore):
    """One layer of a :class:`MergedPair` (``layer`` 0: the earlier, 1: the later), then its own newer tokens.

    :meth:`nbytes` counts the pair's shared tensors half in each layer (the odd byte in the earlier), so the
    two layers' sum is what the pair holds.
    """

    def __init__(self, pair: MergedPair, layer: int):
        self.pair, self.layer = pair, layer

    def append(self, key, value):
        tail = self.pair.tails[self.layer]
        if tail is None:
            self.pair.tails[self.layer] = self.pair.tail_store(key.clone(), value.clone())
        else:
            tail.append(key, value)

    def compress(self) -> None:
        """End of a step under ``--quant``: the tail's (the merged directions were quantized once, at the merge)."""
        tail = self.pair.tails[self.layer]
        if tail is not None:
            tail.compress()

    def view(self):
        key, value = self.pair.restore(self.layer)
        tail = self.pair.tails[self.layer]
        if tail is None:
            return key, value
        tail_key, tail_value = tail.view()
        return torch.cat([key, tail_key], -2), torch.cat([value, tail_value], -2)

    def shape(self):
        b, heads, n = self.pair.directions.shape()
        tail = self.pair.tails[self.layer]
        return b, heads, n + (0 if tail is None else tail.shape()[2])

    def nbytes(self):
        shared = self.pair.shared_bytes()
        return self.pair.own_bytes(self.layer) + shared // 2 + (shared % 2 if self.layer == 0 else 0)

    def write_newest_keys(self, rotated):
        tail = self.pair.tails[self.layer]
        if tail is None or tail.shape()[2] < rotated.shape[-2]:
            raise RuntimeError("merged layers are written only after their prompt: the newest keys must be their own")
        tail.write_newest_keys(rotated)

"""Layer storage other than one dense ``[b, kv_heads, n, d]`` key and value pair.

Some methods hold a layer in a smaller form than the attention kernel reads: KV heads of different
lengths (AdaKV, HeadKV) or keys with pruned channels (ThinK). :class:`lacache_core.CompressedCache`
keeps such a layer in a :class:`LayerStore`, counts the bytes the store really holds, and hands the
attention a dense view built for the current step only (dropped after it), so the model's kernels
run unchanged.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

Pair = Tuple[torch.Tensor, torch.Tensor]


class LayerStore:
    """One layer's keys and values in a form of its own; :meth:`view` is what attention reads."""

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add the newest tokens' ``key`` and ``value`` (each ``[b, kv_heads, q, d]``)."""
        raise NotImplementedError

    def view(self) -> Pair:
        """Dense ``(key, value)``, each ``[b, kv_heads, n, d]``, as :meth:`shape` says."""
        raise NotImplementedError

    def shape(self) -> Tuple[int, int, int]:
        """``(b, kv_heads, n)`` of :meth:`view`."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes the store holds."""
        raise NotImplementedError

    def write_newest_keys(self, rotated: torch.Tensor) -> None:
        """Replace the newest ``q`` keys by ``rotated`` (``[b, kv_heads, q, d]``): keys stored rotated."""
        raise NotImplementedError

    def head_lengths(self) -> Optional[torch.Tensor]:
        """Slots per KV head (``LongTensor [kv_heads]``; ``[b, kv_heads]`` for :class:`RowStores`) where heads
        differ, else ``None``."""
        return None

    # -- the operations a method's tensor work goes through (:meth:`lacache_core.policies.CachePolicy.before_keep`,
    # ``after_keep``); a store that cannot do one refuses it with a one-line error
    def keep(self, keep) -> "LayerStore":
        """The store holding only slots ``keep`` of :meth:`view`: ``None`` (all), ``LongTensor [n_keep]``,
        ``[kv_heads, n_keep]`` or ``[b, kv_heads, n_keep]`` (increasing), or a list of per-head ``[n_h]`` (the
        heads part: a per-head store). May be ``self``, changed."""
        if keep is None:
            return self
        raise RuntimeError(f"{type(self).__name__}: a layer held in a store of its own cannot be compacted again")

    def rewrite_keys(self, keys: torch.Tensor) -> None:
        """Replace the keys by ``keys`` (``[b, kv_heads, n, d]``, as stored), in place: the tensor the step's
        compaction gathers from."""
        raise RuntimeError(f"{type(self).__name__} cannot rewrite keys: a method that merges keys needs its layers "
                           "dense and unquantized")

    def rewrite_values(self, values: torch.Tensor, changed: torch.Tensor) -> None:
        """Replace the values of the slots ``changed`` (``[b, kv_heads, n]`` bool) by theirs in ``values``
        (``[b, kv_heads, n, d]``)."""
        raise RuntimeError(f"{type(self).__name__} cannot rewrite values: a method that merges values needs its "
                           "layers dense or quantized")

    @property
    def prunable(self) -> bool:
        """Whether :meth:`prune_channels` may be called now (no key has lost or been quantized at a width yet)."""
        return False

    def prune_channels(self, channels: torch.Tensor, whole) -> "LayerStore":
        """The store holding only ``channels`` (``LongTensor [kv_heads, d_keep]``, increasing) of its older keys;
        ``whole``: the slots that keep every channel (see :class:`PrunedChannelStore`)."""
        raise RuntimeError(f"{type(self).__name__} cannot prune key channels (prunable is False)")


def gather_slots(key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor) -> Pair:
    """Keep slots ``keep`` of one layer's ``[b, h, n, d]`` key and value: ``LongTensor [n_keep]`` (every head
    alike), ``[h, n_keep]`` (per KV head) or ``[b, h, n_keep]`` (per row and head)."""
    idx = keep if keep.device == key.device else keep.to(key.device)
    if idx.dim() == 1:
        return key.index_select(-2, idx), value.index_select(-2, idx)
    b, h, _, d = key.shape
    full = (idx[None] if idx.dim() == 2 else idx)[..., None].expand(b, h, idx.shape[-1], d)
    return key.gather(2, full), value.gather(2, full)


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def left_padded(heads: List[Pair]) -> Pair:
    """Per-head ``(key, value)`` pairs (``[b, 1, n_h, d]``) as one ``[b, kv_heads, max n_h, d]`` pair, each head
    left-padded with zeros (the cache's mask hides the padding)."""
    n = max(k.shape[-2] for k, _ in heads)

    def pad(t):
        return torch.nn.functional.pad(t, (0, 0, n - t.shape[-2], 0))

    return torch.cat([pad(k) for k, _ in heads], 1), torch.cat([pad(v) for _, v in heads], 1)


class PerHeadStore(LayerStore):
    """Each KV head at its own length: per head ``(key, value)``, each ``[b, 1, n_h, d]``.

    The view is left-padded with zeros to the longest head; the step's mask
    (:func:`lacache_core.masks.step_mask`) hides the padding from the attention.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor, keep: List[torch.Tensor]):
        self.heads = [(key[:, h:h + 1].index_select(-2, idx.to(key.device)),
                       value[:, h:h + 1].index_select(-2, idx.to(key.device))) for h, idx in enumerate(keep)]

    def append(self, key, value):
        self.heads = [(torch.cat([k, key[:, h:h + 1]], -2), torch.cat([v, value[:, h:h + 1]], -2))
                      for h, (k, v) in enumerate(self.heads)]

    def view(self):
        return left_padded(self.heads)

    def shape(self):
        return self.heads[0][0].shape[0], len(self.heads), max(k.shape[-2] for k, _ in self.heads)

    def nbytes(self):
        return _bytes(*(t for head in self.heads for t in head))

    def write_newest_keys(self, rotated):
        q = rotated.shape[-2]
        for h, (k, _) in enumerate(self.heads):
            k[..., k.shape[-2] - q:, :] = rotated[:, h:h + 1]

    def head_lengths(self):
        return torch.tensor([k.shape[-2] for k, _ in self.heads])


class PrunedChannelStore(LayerStore):
    """Keys of the older slots with only some channels, the newest slots and all values whole.

    Parameters
    ----------
    key, value : ``[b, kv_heads, n, d]``, the layer's kept keys (rotated) and values.
    channels : ``LongTensor [kv_heads, d_keep]``, the channels each KV head keeps of its older keys (increasing).
    whole : int or ``LongTensor [kv_heads, w]``
        The slots that keep every channel: the newest ``whole``, or each head's own ``w`` slots of the ``n``
        (ThinK's ``row_order="score"``); all tokens appended later keep every channel too.

    The view's pruned channels are zeros, so a query's dot product with such a key is the one over the
    kept channels only: the attention ThinK's reference computes from the split cache.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor, channels: torch.Tensor, whole):
        b, heads, n, d = key.shape
        self.head_dim = d
        self.channels = channels.to(key.device)
        self.value = value
        if isinstance(whole, int):
            old = max(n - whole, 0)
            self.pruned_at = self.whole_at = None  # slots 0 .. old - 1 pruned, the rest whole
            self.pruned = key[:, :, :old].gather(-1, self._index(b, old))  # [b, kv_heads, old, d_keep]
            self.key = key[:, :, old:].clone()  # [b, kv_heads, n - old, d]
            return
        keeps = torch.zeros(heads, n, dtype=torch.bool, device=key.device).scatter_(-1, whole.to(key.device), True)
        slots = torch.arange(n, device=key.device).expand(heads, n)
        self.pruned_at = slots[~keeps].view(heads, -1)  # [kv_heads, old], increasing
        self.whole_at = slots[keeps].view(heads, -1)  # [kv_heads, n - old], increasing
        self.pruned = _rows(key, self.pruned_at).gather(-1, self._index(b, self.pruned_at.shape[1]))
        self.key = _rows(key, self.whole_at)  # [b, kv_heads, n - old, d], then the appended tokens

    def _index(self, b: int, n: int) -> torch.Tensor:
        return self.channels[None, :, None, :].expand(b, -1, n, -1)

    def append(self, key, value):
        self.key = torch.cat([self.key, key], -2)
        self.value = torch.cat([self.value, value], -2)

    def view(self):
        b, heads, old, _ = self.pruned.shape
        full = self.pruned.new_zeros(b, heads, old, self.head_dim).scatter_(-1, self._index(b, old), self.pruned)
        if self.pruned_at is None:
            return torch.cat([full, self.key], -2), self.value
        first = old + self.whole_at.shape[1]  # the slots held at construction, then the appended ones
        keys = self.key.new_empty(b, heads, first, self.head_dim)
        keys.scatter_(2, _slot_index(self.pruned_at, b, self.head_dim), full)
        keys.scatter_(2, _slot_index(self.whole_at, b, self.head_dim), self.key[:, :, :self.whole_at.shape[1]])
        return torch.cat([keys, self.key[:, :, self.whole_at.shape[1]:]], -2), self.value

    def shape(self):
        return tuple(self.value.shape[:3])

    def nbytes(self):
        where = () if self.pruned_at is None else (self.pruned_at, self.whole_at)  # which slots lost channels
        return _bytes(self.pruned, self.key, self.value, self.channels, *where)

    def write_newest_keys(self, rotated):
        # the newest slots are whole (the last of self.key) under either form of ``whole``
        self.key[..., self.key.shape[-2] - rotated.shape[-2]:, :] = rotated


def _slot_index(slots: torch.Tensor, b: int, d: int) -> torch.Tensor:
    """``[kv_heads, m]`` slots as a gather/scatter index along dim 2 of ``[b, kv_heads, m, d]``."""
    return slots[None, :, :, None].expand(b, -1, -1, d)


def _rows(key: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``key`` (``[b, kv_heads, n, d]``) at each head's ``slots`` (``[kv_heads, m]``): ``[b, kv_heads, m, d]``."""
    return key.gather(2, _slot_index(slots.to(key.device), key.shape[0], key.shape[-1]))


class DenseStore(LayerStore):
    """One dense ``(key, value)`` pair, ``[b, kv_heads, n, d]``: a layer as the kernel reads it, and a row of
    :class:`RowStores` kept whole. Its operations never write into the tensors it was given."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value

    def keep(self, keep):
        if isinstance(keep, list):
            return PerHeadStore(self.key, self.value, keep)
        if keep is not None:
            self.key, self.value = gather_slots(self.key, self.value, keep)
        return self

    def rewrite_keys(self, keys):
        self.key.copy_(keys)

    def rewrite_values(self, values, changed):
        self.value = torch.where(changed[..., None], values.to(self.value.dtype), self.value)

    @property
    def prunable(self) -> bool:
        return True

    def prune_channels(self, channels, whole):
        return PrunedChannelStore(self.key, self.value, channels, whole)

    def append(self, key, value):
        self.key, self.value = torch.cat([self.key, key], -2), torch.cat([self.value, value], -2)

    def view(self):
        return self.key, self.value

    def shape(self):
        return tuple(self.key.shape[:3])

    def nbytes(self):
        return _bytes(self.key, self.value)

    def write_newest_keys(self, rotated):
        self.key[..., self.key.shape[-2] - rotated.shape[-2]:, :] = rotated


class RowStores(LayerStore):
    """A batch whose rows each hold the layer in a store of their own (``stores[j]`` is row ``j``, batch 1).

    The view left-pads each row's view with zeros to the longest row; the cache hides a row's padding
    from attention (its filler slots, and where heads differ, :meth:`head_lengths`).
    """

    def __init__(self, stores: List[LayerStore]):
        self.stores = stores

    def append(self, key, value):
        for j, store in enumerate(self.stores):
            store.append(key[j:j + 1], value[j:j + 1])

    def view(self):
        n = self.shape()[2]
        views = [store.view() for store in self.stores]

        def pad(t):
            return torch.nn.functional.pad(t, (0, 0, n - t.shape[-2], 0))

        return torch.cat([pad(k) for k, _ in views]), torch.cat([pad(v) for _, v in views])

    def shape(self):
        shapes = [store.shape() for store in self.stores]
        return len(shapes), shapes[0][1], max(n for _, _, n in shapes)

    def compress(self) -> None:
        """End of a step under ``--quant``: each row's store's."""
        for store in self.stores:
            store.compress()

    def state(self) -> dict:
        """Every row's store's :meth:`state`, as one flat dict (``"row<j>.<name>"``)."""
        return {f"row{j}.{name}": t for j, store in enumerate(self.stores) for name, t in store.state().items()}

    @classmethod
    def from_state(cls, state: dict, row_from_state: Callable[[dict], LayerStore]) -> "RowStores":
        """The rows :meth:`state` saved, each rebuilt by ``row_from_state`` from its own entries."""
        count = 1 + max(int(name.split(".", 1)[0][3:]) for name in state)
        return cls([row_from_state({name.split(".", 1)[1]: t for name, t in state.items() if name.startswith(f"row{j}.")})
                    for j in range(count)])

    def row_lengths(self) -> torch.Tensor:
        """Slots each row's own view holds (``LongTensor [b]``)."""
        return torch.tensor([store.shape()[2] for store in self.stores])

    def nbytes(self):
        return sum(store.nbytes() for store in self.stores)

    def write_newest_keys(self, rotated):
        for j, store in enumerate(self.stores):
            store.write_newest_keys(rotated[j:j + 1])

    def head_lengths(self):
        if all(store.head_lengths() is None for store in self.stores):
            return None
        heads = self.shape()[1]
        return torch.stack([store.head_lengths() if store.head_lengths() is not None
                            else torch.full((heads,), store.shape()[2]) for store in self.stores])

"""A quantized layer whose KV heads keep different numbers of slots (AdaKV, HeadKV under a quantizer)."""
from __future__ import annotations

import torch

from .errors import ConfigError
from .storage import LayerStore, left_padded


class PerHeadQuantStore(LayerStore):
    """Each KV head at its own length (AdaKV, HeadKV), each held as a one-head quantized store (of ``store``'s class).

    Built once, from a layer whose tokens are all still in full precision (the prompt's pass, before anything
    was quantized), so no token is quantized twice. The view is left-padded with zeros to the longest head, as
    :class:`lacache_core.storage.PerHeadStore`'s; the cache's mask hides the padding.
    """

    def __init__(self, heads: list):
        self.heads = heads

    @classmethod
    def from_store(cls, store, keep: list) -> "PerHeadQuantStore":
        """Keep per-head slots ``keep`` (``[n_h]`` each) of ``store``, which must hold no quantized token yet."""
        if store.key_codes.shape[2]:
            raise RuntimeError("per-head lengths after quantization would quantize tokens twice: choose them first")
        return cls([type(store)(store.config, store.key[:, h:h + 1].index_select(-2, idx.to(store.key.device)),
                                store.value[:, h:h + 1].index_select(-2, idx.to(store.key.device)))
                    for h, idx in enumerate(keep)])

    def append(self, key, value):
        for h, head in enumerate(self.heads):
            head.append(key[:, h:h + 1], value[:, h:h + 1])

    def compress(self) -> None:
        for head in self.heads:
            head.compress()

    def state(self) -> dict:  # the perplexity harness, which checkpoints, refuses prefill-time methods
        raise ConfigError("checkpoints of per-head quantized layers (AdaKV, HeadKV with make_cache.quant) are not built")

    def view(self):
        return left_padded([head.view() for head in self.heads])

    def shape(self):
        return self.heads[0].shape()[0], len(self.heads), max(head.shape()[2] for head in self.heads)

    def nbytes(self):
        return sum(head.nbytes() for head in self.heads)

    def write_newest_keys(self, rotated):
        for h, head in enumerate(self.heads):
            head.write_newest_keys(rotated[:, h:h + 1])

    def head_lengths(self):
        return torch.tensor([head.shape()[2] for head in self.heads])

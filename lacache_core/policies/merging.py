"""KVCache-Factory's ``--merge pivot|weighted``: each evicted token merged into the kept token whose key is most like
its own, instead of dropped.

Followed: Zefan-Cai/KVCache-Factory @ c97f9d7, ``pyramidkv/pyramidkv_utils.py`` (``merge_kv``), which its SnapKV,
PyramidKV, H2O and StreamingLLM clusters call when ``--merge`` is given. Per batch row and KV head, every evicted
token ``d`` goes to the kept token ``j`` (window included) of highest key cosine; keys and values alike:

* ``pivot`` (LOOK-M's): ``R_j <- (R_j + sum_d (X_d + R_j) / 2) / (1 + n_j)``;
* ``weighted`` (KVMerger's, simplified): ``R_j <- (R_j + sum_d w_d X_d) / (1 + sum_d w_d)`` with
  ``w_d = max((cos_d + 1) / 2, 1e-6)``.

A kept token no evicted one chose is left as it was. Keys are compared and averaged as stored, rotated, as the
reference does, so a merging method needs its keys stored rotated and unquantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..storage import gather_slots
from .base import CachePolicy, param

MERGE_MODES = ("pivot", "weighted")


def merge_evicted(key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``key`` and ``value`` (``[b, kv_heads, n, d]``, keys rotated) with the kept slots ``keep`` (``[n_keep]`` or
    ``[kv_heads, n_keep]``) rewritten by merging every other slot into them; new tensors, evicted slots unchanged."""
    heads, n = key.shape[1], key.shape[2]
    keep = keep.to(key.device)
    keep = keep.expand(heads, keep.shape[-1]) if keep.dim() == 1 else keep
    evicted = torch.ones(heads, n, dtype=torch.bool, device=key.device).scatter(-1, keep, False)
    if not evicted.any():
        return key, value
    drop = evicted.nonzero()[:, 1].view(heads, -1)  # every head drops as many: [kv_heads, n_drop]
    kept = [t.float() for t in gather_slots(key, value, keep)]  # [b, kv_heads, n_keep, d], keys then values
    dropped = [t.float() for t in gather_slots(key, value, drop)]
    cosine = F.normalize(dropped[0], dim=-1, eps=1e-6) @ F.normalize(kept[0], dim=-1, eps=1e-6).transpose(-1, -2)
    best, target = cosine.max(-1)  # [b, kv_heads, n_drop]: the kept token (index into keep) each evicted one joins
    weight = torch.ones_like(best) if mode == "pivot" else ((best + 1) / 2).clamp_min(1e-6)
    mass = torch.zeros_like(kept[0][..., 0]).scatter_add(2, target, weight)[..., None]  # [b, kv_heads, n_keep, 1]
    index = keep[None, :, :, None].expand_as(kept[0])
    merged = []
    for states, held, gone in zip((key, value), kept, dropped):
        total = torch.zeros_like(held).scatter_add(2, target[..., None].expand_as(gone), weight[..., None] * gone)
        if mode == "pivot":  # each evicted token brings (X_d + R_j) / 2
            new = (held + total / 2 + mass * held / 2) / (1 + mass)
        else:
            new = (held + total) / (1 + mass)
        merged.append(states.scatter(2, index, new.to(states.dtype)))
    return merged[0], merged[1]


@dataclass
class MergesEvicted(CachePolicy):
    """A method whose evicted tokens may be merged into its kept ones (KVCache-Factory's ``--merge``).

    Parameters
    ----------
    merge : {"pivot", "weighted"}, optional
        Merge each evicted token into the kept token of most similar key, keys and values (KVCache-Factory's
        ``--merge``; only for snapkv, pyramidkv, h2o and streamingllm, as in the reference). ``None``: drop them.
    """

    #: Why a subclass cannot merge (its heads or channels are stored in a form of its own), or ``None``.
    merge_refused: ClassVar[Optional[str]] = None

    merge: Optional[Literal["pivot", "weighted"]] = param(None, added_later=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge is not None and self.merge_refused:
            raise ConfigError(f"{type(self).__name__}.merge is not available for {self.name}: {self.merge_refused}")

    def works_in(self, hook: str) -> bool:
        if hook == "before_keep" and type(self).before_keep is MergesEvicted.before_keep:  # not a subclass's own
            return self.merge is not None
        return super().works_in(hook)

    def before_keep(self, layer, keep, store, value):
        super().before_keep(layer, keep, store, value)
        if self.merge is None or keep is None or isinstance(keep, list):
            return
        key, merged_value = merge_evicted(store.key, value, keep, self.merge)
        store.rewrite_keys(key)
        store.rewrite_values(merged_value, (merged_value != value).any(-1))

"""Checks on the attention masks a compressed cache is run with (both attention paths)."""
from __future__ import annotations

import torch

from ..errors import ConfigError


def refuse_padding(mask, layer_idx: int) -> None:
    """A padded batch (some row's token masked from its own query) is not supported yet: refuse it in one line.

    ``mask`` is the 4D mask as this layer's kernel gets it (bool or additive, ``[b, 1 | heads, q, n]``), fitted
    to the keys. Causal and sliding-window masks always let a query see its own key; only padding hides it.
    """
    if layer_idx != 0 or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return
    q, n = mask.shape[-2], mask.shape[-1]
    own = mask[..., torch.arange(q), torch.arange(n - q, n)]  # each new token's view of its own key
    allowed = own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2
    if not bool(allowed.all()):
        raise ConfigError("a padded batch (attention_mask with zeros) cannot run with a compressed cache yet: pad "
                          "slots would count as tokens; give rows of the same length, or one row at a time")

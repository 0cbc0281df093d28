"""What the attention masks a compressed cache runs with say about padding (both attention paths)."""
from __future__ import annotations

import torch

from .errors import ConfigError


def visible(mask: torch.Tensor) -> torch.Tensor:
    """Where a mask (bool, or additive with the dtype's min for hidden keys) lets a query see a key: bool, same shape."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def own_key_visible(mask: torch.Tensor) -> torch.Tensor:
    """Whether each new token may see its own key: ``[b, q]`` bool, from a 4D mask ``[b, 1 | heads, q, n]``
    (bool or additive) fitted to the keys. Causal and sliding-window masks always let a token see itself; only
    padding hides it."""
    q, n = mask.shape[-2], mask.shape[-1]
    own = mask[..., torch.arange(q), torch.arange(n - q, n)]
    return visible(own).all(1)


def refuse_padding(mask, layer_idx: int) -> None:
    """A padded batch is not supported on this path: refuse it in one line (``mask`` as :func:`own_key_visible`)."""
    if layer_idx != 0 or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return
    if not bool(own_key_visible(mask).all()):
        raise ConfigError("a padded batch (attention_mask with zeros) cannot run with a compressed cache yet: pad "
                          "slots would count as tokens; give rows of the same length, or one row at a time")

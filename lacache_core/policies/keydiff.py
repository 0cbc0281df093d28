"""KeyDiff (Park et al., 2025, arXiv 2504.15364): keep the keys least like the layer's average key.

Followed: kvpress's ``KeyDiffPress`` (``kvpress/presses/keydiff_press.py``, NVIDIA/kvpress @ 8bb29b9). A token's
score is minus the cosine similarity of its key to the mean of the unit-normalised keys of its KV head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .scorer import ScorerPolicy


@dataclass
class KeyDiff(ScorerPolicy):
    """After the prompt, keep per KV head the keys most different (by cosine) from their head's mean direction.

    The paper evicts block by block while the prompt is read; kvpress scores the whole prompt at once (its
    ``BlockPress`` gives the block-wise form). This is kvpress's whole-prompt form.
    """

    name: ClassVar[str] = "keydiff"

    def score(self, query, key, value, rotation, scaling):
        key = key.float()
        anchor = F.normalize(key, dim=-1).mean(2, keepdim=True)  # [b, kvh, 1, d]
        return -F.cosine_similarity(key, anchor, dim=-1)

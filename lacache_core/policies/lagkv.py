"""LagKV (Liang et al., 2025, arXiv 2504.04704): score each token against the next partition of the prompt.

Followed: kvpress's ``LagKVPress`` (``kvpress/presses/lagkv_press.py``, NVIDIA/kvpress @ 8bb29b9). After the sinks,
the prompt is cut into partitions of ``lag_size`` tokens. Each token of a partition is scored, for keys and for
values alike, by the spread (standard deviation over channels) of its channels min-max normalised by the *next*
partition's per-channel range, softmaxed over its partition; key and value scores are averaged. Without
``cross_scoring`` the score becomes the token's rank within its partition, so every partition loses the same share.
The last full partition and the remainder (no partition after them) are kept, with the sinks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import param
from .scorer import ScorerPolicy


def lag_relative(states: torch.Tensor, lag_size: int) -> torch.Tensor:
    """``[b, h, parts, lag_size, d]`` -> ``[b, h, parts - 1, lag_size]``: each partition but the last, scored
    against the next one's per-channel range, softmaxed within the partition."""
    ref, scored = states[:, :, 1:], states[:, :, :-1]
    low, high = ref.min(-2, keepdim=True).values, ref.max(-2, keepdim=True).values
    return ((scored - low) / (high - low)).std(-1).softmax(-1)


@dataclass
class LagKV(ScorerPolicy):
    """After the prompt, keep per KV head the sinks, the tail, and each partition's most lag-relatively spread tokens.

    Parameters
    ----------
    start_size : int
        Leading tokens always kept, before the partitions start (kvpress's ``n_sink``, 4).
    lag_size : int
        Tokens per partition; each is scored against the next (128 in kvpress).
    cross_scoring : bool
        Rank tokens by their score across partitions rather than by their rank within one (kvpress's
        experimental option, off by default).
    """

    name: ClassVar[str] = "lagkv"

    start_size: int = param(4, low=0)
    lag_size: int = param(128, low=2)
    cross_scoring: bool = False

    def score(self, query, key, value, rotation, scaling):
        b, h, n, d = key.shape
        sinks = self.start_size
        if n < sinks + 2 * self.lag_size:  # no partition has a next one: the newest tokens rank highest
            ramp = torch.arange(max(n - sinks, 0), device=key.device, dtype=torch.float32) / max(n - sinks, 1)
            return torch.cat([torch.ones(sinks if n > sinks else n, device=key.device), ramp]).expand(b, h, n)
        parts = (n - sinks) // self.lag_size
        end = sinks + parts * self.lag_size

        def partitioned(x):
            return x[:, :, sinks:end].float().reshape(b, h, parts, self.lag_size, d)

        score = (lag_relative(partitioned(key), self.lag_size) + lag_relative(partitioned(value), self.lag_size)) / 2
        if not self.cross_scoring:
            score = score.argsort(-1).argsort(-1).float() / self.lag_size
        ones = torch.ones(b, h, 1, device=key.device)
        return torch.cat([ones.expand(b, h, sinks), score.reshape(b, h, -1), ones.expand(b, h, n - end + self.lag_size)], -1)

"""NACL (Chen et al., ACL 2024, "NaCl: A General and Effective KV Cache Eviction Framework for LLMs
at Inference Time", arXiv 2408.03675): one eviction at encoding time, by proxy tokens plus random.

*Proxy-tokens eviction*: the attention that a few proxy tokens (the end of the prompt, where the
question sits) pay to each token scores it. *Random eviction*: part of the budget is drawn per head
at random, with probability ``softmax(score / temperature)``, for robustness. This follows
KVCache-Factory's selector (``pyramidkv/nacl.py``, ``select_nacl_tokens`` with proxy mode
``suffix``): the proxy tokens (and sinks) are protected, ``top`` slots go to the best scores and the
rest to sampling among the others. KVCache-Factory takes the random part as an absolute
``random_budget`` (default 0, i.e. no random eviction); we take it as a share of the budget left
after the protected tokens, so that one setting works at every budget, with 0.5 as our default
(a choice of ours, not a number from the paper).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import param
from .prefill import PrefillPolicy
from .scoring import attention_probs, ensure_layer, sample_by_score, seeded_generator, with_protected


@dataclass
class NACL(PrefillPolicy):
    """Compress the prompt once: per KV head, the tokens the proxy tokens attend to most, plus a random share.

    ``window_size`` is the number of proxy tokens (the last prompt tokens), always kept.

    Parameters
    ----------
    start_size : int
        Leading prompt tokens always kept (0 in the reference).
    random_ratio : float
        Share of the budget left after the protected tokens that is sampled rather than taken by score.
    temperature : float
        Temperature of the sampling (<= 0: uniform; the reference's ``random_temperature`` = 1).
    random_seed : int
        Seed of the sampling: draws depend on it and the layer, nothing else.
    """

    name: ClassVar[str] = "nacl"
    per_head: ClassVar[bool] = True

    start_size: int = param(0, low=0)
    random_ratio: float = param(0.5, low=0.0, high=1.0)
    temperature: float = param(1.0)
    random_seed: int = param(0, low=0)

    def observe(self, layer, query, key, scaling):
        ensure_layer(self._window_scores, layer)
        if not self._done:  # the proxy tokens' attention summed over them, every column (as the reference)
            proxies = query[:, :, -min(self.window_size, query.shape[2]):]
            self._window_scores[layer] = attention_probs(proxies, key, scaling).sum(2).mean(0)  # [kvh, n]

    def layer_keep(self, layer: int, n: int, budget: int) -> torch.Tensor:
        scores = self._window_scores[layer]
        s, w = self.start_size, self.window_size
        free = budget - s - w
        sampled = int(free * self.random_ratio)
        generator = seeded_generator(self.random_seed, layer)
        rows = []
        for head in scores[:, s:n - w]:
            top = torch.topk(head, free - sampled).indices
            rest = torch.ones_like(head, dtype=torch.bool)
            rest[top] = False
            others = rest.nonzero().squeeze(-1)
            drawn = others[sample_by_score(head[others], sampled, self.temperature, generator)]
            rows.append(torch.cat([top, drawn]) + s)
        return with_protected(torch.stack(rows), s, w, n)

"""The one rule by which the scheduler and every worker agree on a request's compactions.

The scheduler (which counts blocks) and the workers (which move keys) may live in different processes. Each keeps
a :class:`Ledger` per request and feeds it the same counts, so both derive the same evictions without a message
between them: a request is compacted when a step starts with all of its prompt computed, from the number of tokens
it has computed (``num_computed_tokens``, which both sides read from the scheduler's output).
"""
from __future__ import annotations

from typing import Optional

import torch

from lacache_core.policies.base import CachePolicy


class Ledger:
    """One request's compaction history: its policy, and how many of its tokens left the cache.

    Parameters
    ----------
    policy : a fresh position-only policy, bound to the model's layer count.
    """

    def __init__(self, policy: CachePolicy, num_layers: int):
        self.policy = policy
        self.num_layers = num_layers
        self.evicted = 0        # tokens computed but no longer cached: position = computed - evicted
        self.last_seen = -1     # the computed count at the last compaction check (a step is checked once)

    def held(self, computed: int) -> int:
        """Slots the request occupies when ``computed`` tokens have been computed (after any compaction)."""
        return computed - self.evicted

    def advance(self, computed: int, prompt_tokens: int) -> Optional[torch.Tensor]:
        """The compaction that starts the step at ``computed`` tokens computed.

        Returns
        -------
        ``LongTensor [num_layers, n_keep]``: the slots each layer keeps of its ``held`` slots, moved to
        ``0 .. n_keep - 1``; ``None`` when nothing is evicted at this step (or the step was already checked).
        """
        if computed <= self.last_seen or computed < prompt_tokens:
            return None  # a prompt is written whole (chunked or not) before its first compaction
        self.last_seen = computed
        held = self.held(computed)
        plan = self.policy.select(held, self.num_layers)
        if plan is not None:
            self.evicted += held - plan.shape[1]
        return plan

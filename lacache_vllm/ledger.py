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

from .settings import SCORED_BY_KEYS


class Ledger:
    """One request's compaction history: its policy, and how many of its tokens left the cache.

    Parameters
    ----------
    policy : a fresh policy of a supported method, bound to the model's layer count.
    prompt_tokens : the request's prompt length: no compaction before it is written whole, and what the scheduler
        reserves for it until then.
    """

    def __init__(self, policy: CachePolicy, num_layers: int, prompt_tokens: int):
        self.policy = policy
        self.num_layers = num_layers
        self.scored = policy.name in SCORED_BY_KEYS
        self.budget = policy.max_cache_len(num_layers)
        self.evicted = 0        # tokens computed but no longer cached: slot = computed - evicted
        self.prompt_tokens = prompt_tokens
        self.last_seen = -1     # the computed count at the last compaction check (a step is checked once)
        #: The last compaction's ``[num_layers, n_keep]`` slots of a position-only method (``None`` for a method
        #: scored by keys: its workers ask the policy layer by layer, with the keys).
        self.plan: Optional[torch.Tensor] = None

    def held(self, computed: int) -> int:
        """Slots the request occupies when ``computed`` tokens have been computed (after any compaction)."""
        return computed - self.evicted

    def advance(self, computed: int) -> Optional[int]:
        """Whether the step at ``computed`` tokens computed starts with a compaction: the slots the request keeps,
        or ``None`` (nothing evicted, or the step was already checked).

        A position-only method's choice is computed here (:attr:`plan`); a method scored by keys keeps exactly its
        budget whenever it holds more, which is all the scheduler needs to know.
        """
        if computed <= self.last_seen or computed < self.prompt_tokens:
            return None  # a prompt is written whole (chunked or not) before its first compaction
        self.last_seen = computed
        held = self.held(computed)
        if self.scored:
            kept = self.budget if held > self.budget else None
        else:
            self.plan = self.policy.select(held, self.num_layers)
            kept = None if self.plan is None else self.plan.shape[1]
        if kept is not None:
            self.evicted += held - kept
        return kept

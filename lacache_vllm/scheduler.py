"""The scheduler's side: count a compacted request's blocks by the tokens it holds, and free the rest.

vLLM's scheduler asks ``KVCacheManager.allocate_slots`` for room for ``num_computed_tokens + new`` tokens. For a
request that evicted ``E`` tokens the wrap asks for ``held + new`` instead (``held = computed - E``), and before
that returns to the pool the blocks beyond the ones its held tokens fill, at the same step as the workers compact
(:class:`~lacache_vllm.ledger.Ledger`). ``free`` (finish, abort, preemption) forgets the request's history.

A compressed request never holds more than its budget's blocks once its prompt is written, so the scheduler can
know, when it admits a request, whether the pool will hold every running request at its peak. The wrap passes the
blocks the running requests (and the admitted one) have still to grow by as vLLM's own ``reserved_blocks``: a
request is admitted only where none will have to be preempted for another's growth.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from .ledger import Ledger
from .settings import CompressionSettings


@dataclass
class BlockStats:
    """What a benchmark reads: the most blocks each request held, over its life and while decoding."""

    peak_blocks: Dict[str, int] = field(default_factory=dict)
    decode_peak_blocks: Dict[str, int] = field(default_factory=dict)  # once its prompt was written


class SchedulerCompaction:
    def __init__(self, manager, settings: CompressionSettings, num_layers: int):
        self.manager, self.settings, self.num_layers = manager, settings, num_layers
        self.single = manager.coordinator.single_type_managers[0]
        self.block_size = self.single.block_size
        self.ledgers: Dict[str, Ledger] = {}
        self.stats = BlockStats()
        self._allocate, self._free = manager.allocate_slots, manager.free
        manager.allocate_slots, manager.free = self.allocate_slots, self.free

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def peak_blocks(self, ledger: Ledger) -> int:
        """The most blocks a request holds: its prompt's, or its budget's plus the decoded token's."""
        return max(self._blocks(ledger.prompt_tokens), self._blocks(ledger.budget + 1))

    def growth_reserve(self, admitting) -> int:
        """Blocks the running requests, and ``admitting`` past this allocation, have still to take."""
        reserve = 0
        for req_id, ledger in self.ledgers.items():
            if req_id != admitting.request_id:
                held = len(self.single.req_to_blocks.get(req_id, ()))
                reserve += max(0, self.peak_blocks(ledger) - held)
        return reserve

    def allocate_slots(self, request, num_new_tokens, *args, **kwargs):
        from vllm.v1.request import RequestStatus

        req_id = request.request_id
        if req_id not in self.ledgers:
            self.ledgers[req_id] = Ledger(self.settings.policy(self.num_layers), self.num_layers,
                                          prompt_tokens=request.num_prompt_tokens)
        ledger = self.ledgers[req_id]
        admitting = request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        if admitting:
            own = self.peak_blocks(ledger) - self._blocks(
                request.num_computed_tokens + num_new_tokens)
            kwargs["reserved_blocks"] = kwargs.get("reserved_blocks", 0) + self.growth_reserve(request) + max(0, own)
        if ledger.advance(request.num_computed_tokens) is not None:
            self._release_tail(req_id, ledger.held(request.num_computed_tokens))
        evicted = ledger.evicted
        request.num_computed_tokens -= evicted  # the manager counts the slots the request occupies
        try:
            blocks = self._allocate(request, num_new_tokens, *args, **kwargs)
        finally:
            request.num_computed_tokens += evicted
        if blocks is None and admitting:  # not admitted: it holds nothing, and reserves nothing, until it is
            del self.ledgers[req_id]
            return None
        held_blocks = len(self.single.req_to_blocks.get(req_id, ()))
        self.stats.peak_blocks[req_id] = max(self.stats.peak_blocks.get(req_id, 0), held_blocks)
        if request.num_computed_tokens >= request.num_prompt_tokens:
            peaks = self.stats.decode_peak_blocks
            peaks[req_id] = max(peaks.get(req_id, 0), held_blocks)
        return blocks

    def _release_tail(self, req_id: str, held: int) -> None:
        blocks = self.single.req_to_blocks[req_id]
        still = self._blocks(held)
        tail = blocks[still:]
        del blocks[still:]
        self.single.block_pool.free_blocks(reversed(tail))

    def free(self, request, *args, **kwargs):
        self.ledgers.pop(request.request_id, None)
        return self._free(request, *args, **kwargs)


def install(scheduler_cls) -> None:
    """Wrap ``scheduler_cls.__init__``: a scheduler whose engine has ``kv_compression`` gets a
    :class:`SchedulerCompaction` (as ``scheduler.kv_compression``) on its KV cache manager."""
    if getattr(scheduler_cls, "_kv_compression_installed", False):
        return
    init = scheduler_cls.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        settings = CompressionSettings.from_config(vllm_config.additional_config)
        self.kv_compression = None
        if settings is not None:
            layers = vllm_config.model_config.hf_text_config.num_hidden_layers
            self.kv_compression = SchedulerCompaction(self.kv_cache_manager, settings, layers)

    scheduler_cls.__init__ = __init__
    scheduler_cls._kv_compression_installed = True

"""The worker's side: move kept keys to their slots before a step, and give new tokens their slot as position.

Three wraps of the model runner (``GPUModelRunner``, which vLLM's CPU runner inherits), no copy of its code:

* after ``initialize_kv_cache``, the backend's paged layout is probed and every layer's cache bound;
* before ``_update_states`` (which appends the step's new blocks to each request's block table), every request
  whose :class:`~lacache_vllm.ledger.Ledger` compacts at this step has, in every layer, its kept slots moved to the
  front (keys re-rotated by the distance they move) and its block list cut to the blocks it still fills, as the
  scheduler cut it;
* after ``_prepare_inputs`` (which derives positions, sequence lengths and slot mappings from the computed-token
  counts), a request that evicted ``E`` tokens has its new tokens' positions and its sequence length lowered by
  ``E``, and the slot mapping is recomputed: new tokens land at slot = position = ``held``, as in our Hugging Face
  cache. Token ids are still read at the unshifted index, before the shift.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from lacache_core.errors import ConfigError

from .kv_layout import SlotAccess, probe_layout, stacked
from .ledger import Ledger
from .rotation import KeyMover
from .settings import CONFIG_KEY, CompressionSettings


def _rotary_of(model: torch.nn.Module, layer_name: str) -> torch.nn.Module:
    """The rotary embedding of the attention module that owns ``layer_name`` (``...self_attn.attn``)."""
    parent = layer_name.rsplit(".", 1)[0]
    try:
        rotary = model.get_submodule(parent).rotary_emb
    except AttributeError:
        rotary = next((m for m in model.modules() if hasattr(m, "cos_sin_cache")), None)
    if rotary is None:
        raise ConfigError(f"{CONFIG_KEY} needs a rotary position embedding; {layer_name} has none")
    return rotary


class WorkerCompaction:
    """One model runner's compactions (its own copy of every request's ledger)."""

    def __init__(self, runner, settings: CompressionSettings):
        self.runner, self.settings = runner, settings
        self.num_layers = runner.model_config.hf_text_config.num_hidden_layers
        self.ledgers: Dict[str, Ledger] = {}
        self.layers: List[Tuple[int, SlotAccess, KeyMover]] = []
        self.layout: Optional[str] = None
        #: Every layer's keys and values as one view each, and the model layer of each entry, where the engine's
        #: buffers allow it (:func:`lacache_vllm.kv_layout.stacked`) and one rotary serves every layer.
        self.stack = None

    # ------------------------------------------------------------------ set-up, once the KV tensors exist
    def bind_caches(self) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        runner = self.runner
        groups = runner.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ConfigError(f"{CONFIG_KEY} needs one KV cache group (every layer full attention); this model has "
                              f"{len(groups)}")
        block_size = runner.input_batch.block_table[0].block_size
        if block_size != runner.cache_config.block_size:
            raise ConfigError(f"{CONFIG_KEY} needs the attention kernel's block size ({block_size}) to equal the "
                              f"engine's block_size ({runner.cache_config.block_size})")
        context = runner.compilation_config.static_forward_context
        model = runner.get_model()
        self.layers, movers, self.stack = [], {}, None
        for name in groups[0].layer_names:
            attn = context[name]
            cache = attn.kv_cache[0] if isinstance(attn.kv_cache, (list, tuple)) else attn.kv_cache
            heads, dim = attn.num_kv_heads, attn.head_size
            if self.layout is None:
                self.layout = probe_layout(attn, cache, block_size, heads, dim)
            rotary = _rotary_of(model, name)
            mover = movers.setdefault(id(rotary), KeyMover(rotary))  # vLLM shares one rotary module among layers
            self.layers.append((extract_layer_index(name), SlotAccess(self.layout, cache, heads, dim), mover))
        views = stacked([access for _, access, _ in self.layers])
        if views is not None and len(movers) == 1:
            self.stack = views + (torch.tensor([layer for layer, _, _ in self.layers]), mover)

    # ------------------------------------------------------------------ before _update_states
    def ledger(self, req_id: str, prompt_tokens: int) -> Ledger:
        if req_id not in self.ledgers:
            self.ledgers[req_id] = Ledger(self.settings.policy(self.num_layers), self.num_layers, prompt_tokens)
        return self.ledgers[req_id]

    def before_update(self, scheduler_output) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.ledgers.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:  # new, or back after a preemption: a fresh history
            self.ledgers.pop(new.req_id, None)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in cached.resumed_req_ids:  # preempted: recomputed from its first token, a fresh history
                self.ledgers.pop(req_id, None)
                continue
            state = self.runner.requests[req_id]
            ledger = self.ledger(req_id, state.num_prompt_tokens)
            held = ledger.held(cached.num_computed_tokens[i])
            kept = ledger.advance(cached.num_computed_tokens[i])
            if kept is not None:
                self.compact(req_id, state, ledger, held, kept)

    def _choice(self, ledger: Ledger, layer: int, access: SlotAccess, blocks: torch.Tensor, held: int,
                kept: int) -> torch.Tensor:
        """The slots ``layer`` keeps, ``[kv_heads, kept]``, as a method scored by keys chooses them from the keys."""
        key, _ = access.read(blocks, torch.arange(held))  # [held, kv_heads, head_dim], as the policy scores them
        ledger.policy.observe(layer, None, key.transpose(0, 1).contiguous()[None], 1.0)
        keep = ledger.policy.keep(layer, held)
        if keep is None or keep.shape[-1] != kept:
            raise RuntimeError(f"{CONFIG_KEY}: {ledger.policy.name} kept "
                               f"{held if keep is None else keep.shape[-1]} slots of {held} in layer {layer}, where "
                               f"the scheduler counted {kept}")
        return keep

    def compact(self, req_id: str, state, ledger: Ledger, held: int, kept: int) -> None:
        """Move each layer's kept slots (of ``held``) to the front, and cut the block list at ``kept`` slots."""
        block_ids = state.block_ids[0]
        blocks = torch.tensor(block_ids, dtype=torch.long)
        at_slot = ledger.policy.position_mode == "slot"
        if not ledger.scored and self.stack is not None:
            self._compact_stacked(ledger.plan, kept, blocks, at_slot)
        else:
            for layer, access, mover in self.layers:
                keep = self._choice(ledger, layer, access, blocks, held, kept) if ledger.scored else ledger.plan[layer]
                move = self._move(keep, kept, blocks, access, mover, at_slot)
                if move is not None:
                    source, dest, turn = move
                    key, value = access.key[source], access.value[source]  # read all, then write: none is behind
                    access.write_at(dest, mover.apply(key, turn) if turn is not None else key, value)
        still = -(-kept // self.layers[0][1].block_size)
        del block_ids[still:]
        row = self.runner.input_batch.req_id_to_index.get(req_id)
        if row is not None:
            table = self.runner.input_batch.block_table[0]
            table.num_blocks_per_row[row] = min(int(table.num_blocks_per_row[row]), still)

    def _compact_stacked(self, plan: torch.Tensor, kept: int, blocks: torch.Tensor, at_slot: bool) -> None:
        """Every layer's move of a position-only plan in one read and one write of the stacked views, from the first
        slot any layer moves (the slots before it stay in every layer)."""
        keys, values, model_layers, mover = self.stack
        plan = plan[model_layers]  # [layers, kept], in the order of the stacked views
        target = torch.arange(kept)
        moving = (plan != target).any(dim=0)
        if not bool(moving.any()):
            return
        first = int(moving.nonzero()[0])
        source, dest = plan[:, first:], target[first:].expand(plan.shape[0], kept - first)
        block_size = keys.shape[2]
        layer = torch.arange(plan.shape[0])[:, None].expand_as(source)
        where_source = (layer, blocks[source // block_size], source % block_size)
        where_dest = (layer, blocks[dest // block_size], dest % block_size)
        key, value = keys[where_source], values[where_source]  # [layers, n, kv_heads, head_dim]
        if at_slot:
            cos, sin = mover.turn((dest - source).flatten())  # [layers * n, 1, rotary_dim / 2]
            key = mover.apply(key, (cos.view(*source.shape, 1, -1), sin.view(*source.shape, 1, -1)))
        keys[where_dest] = key
        values[where_dest] = value

    @staticmethod
    def _move(keep: torch.Tensor, kept: int, blocks: torch.Tensor, access: SlotAccess, mover: KeyMover,
              at_slot: bool):
        """``(source, dest, turn)`` for a layer that keeps ``keep`` (``None``: nothing moves): the slots' indices in
        the views, and the keys' rotation by the distance they move (``None`` where keys keep their positions)."""
        target = torch.arange(kept).expand_as(keep)
        if keep.dim() == 1:
            moves = keep != target
            if not bool(moves.any()):
                return None
            keep, target = keep[moves], target[moves]
        elif torch.equal(keep, target):
            return None
        turn = mover.turn(target - keep) if at_slot else None
        return access.where(blocks, keep), access.where(blocks, target), turn

    # ------------------------------------------------------------------ after _prepare_inputs
    def shift_positions(self, num_reqs: int) -> None:
        """New tokens go to slot ``held + i``; their position is that slot (``key_positions="slot"``) or stays
        their place in the request (``"original"``: the rotary sees it, the slot mapping does not)."""
        runner = self.runner
        starts = runner.query_start_loc.np
        restore = []
        for row, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
            ledger = self.ledgers.get(req_id)
            if ledger is None or ledger.evicted == 0:
                continue
            evicted, tokens = ledger.evicted, slice(int(starts[row]), int(starts[row + 1]))
            runner.positions[tokens] -= evicted
            runner.seq_lens[row] -= evicted
            runner.optimistic_seq_lens_cpu[row] -= evicted
            runner.num_computed_tokens[row] -= evicted
            restore.append((tokens, evicted, ledger.policy.position_mode == "original"))
        if restore:
            total = int(starts[num_reqs])
            runner.input_batch.block_table.compute_slot_mapping(
                num_reqs, runner.query_start_loc.gpu[:num_reqs + 1], runner.positions[:total])
            for tokens, evicted, original in restore:
                if original:
                    runner.positions[tokens] += evicted


def install(runner_cls) -> None:
    """Wrap ``runner_cls``'s three methods; a runner whose engine has no ``kv_compression`` runs unchanged."""
    if getattr(runner_cls, "_kv_compression_installed", False):
        return
    initialize, update, prepare = (runner_cls.initialize_kv_cache, runner_cls._update_states,
                                   runner_cls._prepare_inputs)

    def compaction(runner) -> Optional[WorkerCompaction]:
        if not hasattr(runner, "_kv_compression"):
            settings = CompressionSettings.from_config(runner.vllm_config.additional_config)
            runner._kv_compression = None if settings is None else WorkerCompaction(runner, settings)
        return runner._kv_compression

    def initialize_kv_cache(self, *args, **kwargs):
        out = initialize(self, *args, **kwargs)
        if compaction(self) is not None:
            self._kv_compression.bind_caches()
        return out

    def _update_states(self, scheduler_output, *args, **kwargs):
        if compaction(self) is not None:
            self._kv_compression.before_update(scheduler_output)
        return update(self, scheduler_output, *args, **kwargs)

    def _prepare_inputs(self, *args, **kwargs):
        out = prepare(self, *args, **kwargs)
        if compaction(self) is not None:
            self._kv_compression.shift_positions(self.input_batch.num_reqs)
        return out

    runner_cls.initialize_kv_cache = initialize_kv_cache
    runner_cls._update_states = _update_states
    runner_cls._prepare_inputs = _prepare_inputs
    runner_cls._kv_compression_installed = True

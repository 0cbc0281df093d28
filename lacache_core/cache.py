"""Hugging Face cache objects that apply a :class:`CachePolicy` as the model runs.

:class:`CompressedCache` is a ``DynamicCache`` whose keys sit at the positions its policy declares (cache slot
or original position). It is a front over the stages of :mod:`lacache_core.step`. The model's own attention
forward runs unchanged and makes two calls per layer and step into the cache besides its own ``update``:

1. the position-shift pre-hook asks :meth:`CompressedCache.position_embeddings` for the rotation of the new
   query and keys (:mod:`.step.placement`);
2. the attention kernel enters ``with cache.attend(...) as step``: the step (:class:`lacache_core.step.LayerStep`)
   holds the rotated query, keys and values and the mask the kernel needs; scoring policies have seen them; when
   the kernel is done, the layer is compacted for the next step (:mod:`.step.compaction`).

It therefore works in a plain forward loop and in ``model.generate(past_key_values=...)`` (``cache=`` from
transformers 5.24), and bounds memory in both.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from .errors import ConfigError
from .policies import CachePolicy
from .quantizers import Quantizer
from .readers import Reader
from .step import LayerStep
from .step.compaction import settle
from .step.placement import KEY_ROTATIONS, KeyPlacement, check_key_rotation
from .step.reads import SparseReads, slot_shift
from .step.rows import BatchRows
from .storage import LayerStore, RowStores
from .versions import HAS_CACHE_CLASSES

if HAS_CACHE_CLASSES:
    from transformers import DynamicCache
else:  # transformers < 4.36 has tuple caches only; see ppl_legacy/
    DynamicCache = object

__all__ = ["CompressedCache", "KEY_ROTATIONS", "cache_layers", "kv_bytes"]


def _read_counter(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.reads, name), lambda self, v: setattr(self.reads, name, v), doc=doc)


def observe(policy, layer: int, query, key, value, scaling: float, rotation, module) -> None:
    """Show ``policy`` one layer's step (one batch row's part of it): the attention module and the values where it
    reads them (:attr:`CachePolicy.reads_weights`, :attr:`CachePolicy.observes_values`), then queries and keys."""
    if policy.reads_weights:
        policy.read_weights(layer, module)
    if policy.observes_values:
        policy.observe_values(layer, value, rotation)
    policy.observe(layer, query, key, scaling)


class CompressedCache(DynamicCache):
    """A ``DynamicCache`` compacted layer by layer by ``policy``, its keys at the policy's positions.

    Parameters
    ----------
    policy : CachePolicy
        Decides which slots each layer keeps (e.g. :class:`lacache_core.LaCache`) and where kept keys sit
        (``policy.position_mode``: cache slot or original position).
    num_layers : int
        Decoder layers of the model.
    query_at_slot : bool
        For slot-position policies: rotate queries at the slot their key occupies (``True``, correct and what
        generate needs) or at the ``position_ids`` the caller passes (reproduces the official harness's positions).
    key_rotation : {"auto", "every_step", "incremental"}
        How stored keys get their rotation.

        * ``"every_step"``: keys are stored un-rotated and all of them are rotated at every step, as the official
          code does. Exact in any dtype; costs a rotation of the whole cache per layer and step.
        * ``"incremental"``: keys are stored rotated, a new key once. When a compaction moves kept keys of a
          slot-position policy to lower slots, the layer's frame moves with its newest run of keys, and only the
          older kept keys are rotated by what they moved less (:mod:`lacache_core.step.placement`).
          Original-position policies never move a key, so this is exact for them; for slot policies each
          rotation adds one rounding of the key (about 1e-7 relative in float32).
        * ``"auto"`` (default): ``"incremental"`` for original-position policies, and for slot policies in
          float32/float64 with a RoPE whose position 0 is the identity; ``"every_step"`` otherwise (in bf16/fp16
          the roundings of repeated shifts add up; YaRN's scaled tables do not compose).
    quant : Quantizer, optional
        Store every layer quantized (:mod:`lacache_core.quantizers`); eviction runs on the codes.
    read : Reader, optional
        Read each decode step's keys sparsely (:mod:`lacache_core.readers`); :attr:`read_bytes` and
        :attr:`dense_read_bytes` count the bytes decode steps touch.
    """

    read_bytes = _read_counter("read_bytes", "Bytes of keys, values and page metadata decode steps read.")
    dense_read_bytes = _read_counter("dense_read_bytes", "Bytes decode steps would read densely.")
    metadata_read_bytes = _read_counter("metadata_read_bytes", "The page metadata's part of read_bytes.")

    def __init__(self, policy: CachePolicy, num_layers: int, query_at_slot: bool = True,
                 key_rotation: str = "auto", quant: Optional[Quantizer] = None, read: Optional[Reader] = None):
        if not HAS_CACHE_CLASSES:
            raise RuntimeError("CompressedCache needs transformers >= 4.36; use ppl_legacy/ with tuple caches")
        key_rotation = check_key_rotation(policy, key_rotation, query_at_slot, quant)
        super().__init__()
        policy.bind(num_layers)
        self.policy, self.num_layers, self.query_at_slot = policy, num_layers, query_at_slot
        self.key_rotation = key_rotation
        self.quant, self.read = quant, read
        self.placement = KeyPlacement(policy, key_rotation, query_at_slot, num_layers)
        self.rows = BatchRows(policy, num_layers)
        self.reads = SparseReads(read, num_layers)
        self.peak_bytes, self._step_bytes = 0, 0
        self._next_position = 0  # original position of the first new token of the current forward pass
        self._unread = [False] * num_layers  # written by update, not yet read by attend
        #: Layers held in a form of their own (heads of different lengths, pruned key channels, quantized);
        #: transformers' storage then holds a stand-in of the right length and no memory.
        self._stores = [None] * num_layers
        self._layered = isinstance(getattr(self, "layers", None), list)  # >= 4.54: per-layer objects

    # -- storage, across transformers' two DynamicCache layouts
    def _stored(self, i: int):
        """Layer ``i``'s ``(key, value)`` as stored (keys in the layer's frame)."""
        if self._stores[i] is not None:
            return self._stores[i].view()
        if self._layered:
            return self.layers[i].keys, self.layers[i].values
        return self.key_cache[i], self.value_cache[i]

    def _layer(self, i: int):
        """Layer ``i``'s ``(key, value)``, keys stored rotated at their slot (or position), or un-rotated."""
        key, value = self._stored(i)
        if self.placement.offsets[i] and isinstance(key, torch.Tensor):
            key = self.placement.in_frame(i, key, 0)
        return key, value

    def _set_layer(self, i: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if self._layered:
            self.layers[i].keys, self.layers[i].values = key, value
        else:
            self.key_cache[i], self.value_cache[i] = key, value

    def _keep_in_store(self, i: int, store: LayerStore, like: torch.Tensor) -> None:
        """Hold layer ``i`` in ``store``, and in transformers' own storage a stand-in of the same length but no
        memory (its lengths and masks stay right)."""
        self._stores[i] = store
        self._sync_stand_in(i, like)

    def _sync_stand_in(self, i: int, like: torch.Tensor) -> None:
        stand_in = like.new_zeros(1, 1, 1, 1).expand(*self._stores[i].shape(), 1)
        self._set_layer(i, stand_in, stand_in)

    def head_lengths(self, i: int) -> Optional[torch.Tensor]:
        """Slots each KV head of layer ``i`` holds (``LongTensor [kv_heads]``), or ``None`` if all heads hold the same."""
        return None if self._stores[i] is None else self._stores[i].head_lengths()

    # -- bytes
    def kv_bytes(self) -> int:
        """Bytes held by keys and values of all layers (counted as stored: unpadded heads, pruned channels), and
        by the page metadata of sparse reads."""
        return sum(self._layer_bytes(i) + self.reads.page_bytes(i) for i in range(self.num_layers))

    def _layer_bytes(self, i: int) -> int:
        if self._stores[i] is not None:
            return self._stores[i].nbytes()
        if i >= (len(self.layers) if self._layered else len(self.key_cache)):
            return 0
        key, value = self._stored(i)
        if key is None or not isinstance(key, torch.Tensor):
            return 0
        return key.numel() * key.element_size() + value.numel() * value.element_size()

    def _count_step_bytes(self, i: int) -> None:
        self._step_bytes = (0 if i == 0 else self._step_bytes) + self._layer_bytes(i) + self.reads.page_bytes(i)
        if i == self.num_layers - 1:
            self.peak_bytes = max(self.peak_bytes, self._step_bytes)

    # -- the two calls of the attention side
    def position_embeddings(self, layer_idx: int, embeddings, rotation):
        """The ``(cos, sin)`` the model's attention should use for its new query and keys, and whether they rotate
        the keys (``False``: keys are stored un-rotated and get an identity). Asked by the pre-hook."""
        if layer_idx == 0:  # rows of a batch count their own tokens; positions count the batch's, padding included
            self._next_position = self.policy.seen if self.rows.policies is None else self.rows.tokens_in
        return self.placement.new_embeddings(layer_idx, embeddings, rotation, self.get_seq_length(layer_idx),
                                             self._next_position, self.rows.pads)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # A layer written twice without being read went through an unpatched attention: its keys were
        # rotated by the model, and the next step would silently mix rotated and un-rotated keys.
        if self._unread[layer_idx]:
            raise RuntimeError(
                "this model's attention is not position-shifted: call lacache_core.enable_position_shift(model) "
                "before running it with a CompressedCache"
            )
        self._unread[layer_idx] = True
        store = self._stores[layer_idx]
        if store is None and self.quant is not None:
            super().update(key_states, value_states, layer_idx, *args, **kwargs)  # the layer's place in the list
            self._keep_in_store(layer_idx, self.quant.new_store(key_states, value_states), key_states)
            return self._stores[layer_idx].view()
        if store is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        store.append(key_states, value_states)
        self._sync_stand_in(layer_idx, key_states)
        return store.view()  # this step's attention input, dropped after it

    @contextmanager
    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rotation,
               scaling: float, position_ids: Optional[torch.Tensor] = None, mask=None,
               sliding_window: Optional[int] = None, keys_rotated: bool = False, module=None):
        """The attention kernel's one call: ``with cache.attend(...) as step``, then run the kernel on ``step.query``,
        ``step.key``, ``step.value`` and ``step.mask``; the layer is compacted when the block ends.

        ``query`` is ``[b, heads, q, d]``; ``key`` and ``value`` (``[b, kv_heads, n, d]``) are what :meth:`update`
        returned; ``rotation`` is the model's :class:`lacache_core.rope.Rotation`; ``position_ids`` (``[b, q]``) are
        used only when ``query_at_slot`` is off; ``mask`` is the model's, fitted to the ``n`` keys;
        ``keys_rotated``: whether the model rotated the new query and keys with :meth:`position_embeddings`' answer;
        ``module``: the attention module, for a policy that reads its weights.
        Yields a :class:`lacache_core.step.LayerStep` whose query and keys are rotated.
        """
        step = self._begin(layer_idx, query, key, value, rotation, scaling, position_ids, keys_rotated, module)
        step.model_mask, step.sliding_window = mask, sliding_window
        yield step
        settle(self, step)

    def _begin(self, layer: int, query, key, value, rotation, scaling, position_ids, keys_rotated,
               module=None) -> LayerStep:
        """record -> place -> observe -> plan the read, up to the kernel."""
        self._unread[layer] = False
        n, q_len = key.shape[-2], query.shape[-2]
        if layer == 0:
            self.rows.tokens_in += q_len
        rows = self.rows.for_batch(key.shape[0])
        before = None if rows is None else self.rows.fillers[layer]  # [b], before this step's compaction
        fillers = [0] if rows is None else before.tolist()
        for row_policy, f in zip(rows or [self.policy], fillers):
            row_policy.record(layer, n - f, key.device)
        step = LayerStep(layer, query, key, value, stored_key=key, lengths=self.head_lengths(layer), rows=rows,
                         fillers_before=before)
        if not keys_rotated:
            step.query, keys, new = self.placement.place(step, rotation, position_ids, rows, self.rows.pads,
                                                         self.rows.tokens_in)
            step.key = keys if new is None else self._write_newest_keys(layer, key, value, new)
            step.stored_key = key if new is None else step.key
        if rows:
            for j, row_policy in enumerate(rows):
                real = min(q_len, n - fillers[j])  # the new tokens of row j that are not padding
                observe(row_policy, layer, step.query[j:j + 1, :, q_len - real:], step.key[j:j + 1, :, fillers[j]:],
                        step.value[j:j + 1, :, fillers[j]:], scaling, rotation, module)
        elif self.policy.observes:
            observe(self.policy, layer, step.query, step.key, step.value, scaling, rotation, module)
        self._count_step_bytes(layer)
        # after padding, the model's mask says where the input's pads were, not where compaction moved each row's
        # tokens; without padding it is right while no row holds fillers
        if rows is not None and (self.rows.pads is not None or any(fillers) or self._stores[layer] is not None):
            step.fillers = before
        if self.read is not None:
            shift = slot_shift(step, self.placement.slot)
            self.reads.plan(step, self._layer_bytes(layer), self._stores[layer] is not None, shift, rotation)
        return step

    def _write_newest_keys(self, layer: int, key, value, rotated: torch.Tensor) -> torch.Tensor:
        """Store the rotated new keys in place of the un-rotated ones ``update`` appended; all keys, rotated."""
        n, q_len = key.shape[-2], rotated.shape[-2]
        if self._stores[layer] is not None:  # the view is a copy: write the rotation into the store too
            self._stores[layer].write_newest_keys(rotated)
            key = key.clone()
            key[..., n - q_len:, :] = rotated
            return key
        if key.requires_grad or rotated.requires_grad:  # in-place writes would break autograd
            key = torch.cat([key[..., :n - q_len, :], rotated], -2)
            self._set_layer(layer, key, value)
        else:
            key[..., n - q_len:, :] = rotated
        return key

    def compact(self) -> None:
        """Apply the policy's next choice to every layer now, between forward passes (KVzip chooses after the passes
        that score its prompt, when no layer is attending); in a batch whose rows have policies of their own, each
        row's."""
        rows = self.rows.policies
        for layer in range(self.num_layers):
            key, value = self._stored(layer)
            fillers = None if rows is None else self.rows.fillers[layer]
            settle(self, LayerStep(layer, None, key, value, stored_key=key, rows=rows, fillers_before=fillers))

    # -- batches
    @classmethod
    def for_rows(cls, policies: list, num_layers: int, query_at_slot: bool = True, key_rotation: str = "auto",
                 quant: Optional[Quantizer] = None, read: Optional[Reader] = None) -> "CompressedCache":
        """One cache for a batch whose rows have policies of their own: one method, its settings per row (a
        budget sized to each row's prompt, sinks by each prompt's length). Row ``j`` of every forward pass is
        compacted by ``policies[j]``; the arguments are as for the constructor."""
        first = policies[0]
        if any(type(p) is not type(first) for p in policies):
            raise ConfigError("the rows of a batch must use one method: " + ", ".join(sorted({p.name for p in policies})))
        cache = cls(first, num_layers, query_at_slot=query_at_slot, key_rotation=key_rotation, quant=quant, read=read)
        if len(policies) > 1:
            cache.rows.set_policies(policies)
        return cache

    def batch_state(self) -> dict:
        """What a batch of rows with policies of their own needs to continue (``{}`` without such rows): the
        other rows' policy states, each layer's filler slots per row, and the tokens fed."""
        return self.rows.state()

    def restore_batch(self, state: dict) -> None:
        """Continue the batch :meth:`batch_state` saved (row 0's policy is this cache's own, restored with it)."""
        self.rows.restore(state)

    def row_alone(self, row: int) -> "CompressedCache":
        """A copy of batch row ``row``'s own tokens (its filler slots left out) in a cache of one row, under the row's
        own policy, to run forward passes of that row alone (KVzip's scoring passes); this cache is left as it is.

        The copy holds the layers as this cache stores them (keys in the same frame, under the same quantizer, tokens
        already quantized copied dequantized), so every layer's heads must be of one length (a row before a per-head
        choice)."""
        if self.rows.policies is None:
            raise RuntimeError("row_alone needs a batch whose rows have policies of their own")
        alone = CompressedCache(self.rows.policies[row], self.num_layers, self.query_at_slot, self.key_rotation,
                                quant=self.quant)
        for layer in range(self.num_layers):
            store = self._stores[layer]
            if isinstance(store, RowStores):
                store = store.stores[row]
                key, value = store.view()
            else:
                key, value = self._stored(layer)
                filler = int(self.rows.fillers[layer][row])
                key, value = key[row:row + 1, :, filler:], value[row:row + 1, :, filler:]
            if store is not None and store.head_lengths() is not None:
                raise RuntimeError("row_alone copies rows whose heads hold one length (before a per-head choice)")
            alone.update(key.clone(), value.clone(), layer)
            alone._unread[layer] = False  # written here, not by an attention that must read it
        return alone

    def row_positions(self, row: int):
        """Original positions held for batch row ``row`` (as :meth:`kept_positions`)."""
        return self.rows.positions(row)

    def stores_rotated(self, rotation, like: torch.Tensor) -> bool:
        """Whether stored keys carry their rotation (``key_rotation`` resolved on the first call)."""
        return self.placement.stores_rotated(rotation, like)

    def kept_positions(self):
        """Original token positions held: ``LongTensor [num_layers, n]``, or, where layers or heads differ
        (the prefill-time methods), a list with one ``[n_l]`` or ``[kv_heads, n_l]`` tensor per layer."""
        return self.policy.positions


def cache_layers(cache) -> list:
    """Per-layer ``(key, value)`` of any cache the harnesses use: tuples (transformers < 4.36),
    :class:`CompressedCache`, or a ``DynamicCache`` of either layout."""
    if cache is None:
        return []
    if isinstance(cache, (list, tuple)):
        return [tuple(layer[:2]) for layer in cache]
    if isinstance(cache, CompressedCache):
        return [cache._layer(i) for i in range(cache.num_layers)]
    if isinstance(getattr(cache, "layers", None), list):
        return [(layer.keys, layer.values) for layer in cache.layers if getattr(layer, "keys", None) is not None]
    return list(zip(cache.key_cache, cache.value_cache))


def kv_bytes(cache) -> int:
    """Bytes held by the keys and values of every layer of ``cache`` (any layout)."""
    if isinstance(cache, CompressedCache):
        return cache.kv_bytes()
    return sum(t.numel() * t.element_size() for layer in cache_layers(cache) for t in layer)

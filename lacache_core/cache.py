"""Hugging Face cache objects that apply a :class:`CachePolicy` as the model runs.

:class:`CompressedCache` is a ``DynamicCache`` whose keys sit at the positions its policy declares
(cache slot or original position). The model's own attention forward runs unchanged: the
position-shift hook gives it the rotation the cache asks for (:meth:`CompressedCache.position_embeddings`),
it stores its new keys through :meth:`CompressedCache.update`, and the attention kernel then makes
one call, :meth:`CompressedCache.attend`, which lets scoring policies see the rotated query and
keys, compacts the layer for the next step, and hands the tensors of this step back. Keys are
stored rotated (``key_rotation="incremental"``) or un-rotated and rotated at every step
(``"every_step"``, the official code's way). It therefore works in a plain forward loop and in
``model.generate(past_key_values=...)`` (``cache=`` from transformers 5.24), and bounds memory in both.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from .errors import ConfigError
from .masks import own_key_visible, visible
from .policies import CachePolicy, FullCache, build_policy, policy_from_state
from .policies.base import gather_layer
from .quant import PerHeadQuantStore, QuantizedStore
from .quantizers import Quantizer
from .readers import Reader
from .storage import DenseStore, LayerStore, PerHeadStore, PrunedChannelStore, RowStores
from .versions import HAS_CACHE_CLASSES, with_cache

KEY_ROTATIONS = ("auto", "every_step", "incremental")

if HAS_CACHE_CLASSES:
    from transformers import DynamicCache
else:  # transformers < 4.36 has tuple caches only; see ppl_legacy/
    DynamicCache = object


class CompressedCache(DynamicCache):
    """A ``DynamicCache`` compacted layer by layer by ``policy``, its keys at the policy's positions.

    Parameters
    ----------
    policy : CachePolicy
        Decides which slots each layer keeps (e.g. :class:`lacache_core.LaCache`) and where kept
        keys sit (``policy.position_mode``: cache slot or original position).
    num_layers : int
        Decoder layers of the model.
    query_at_slot : bool
        For slot-position policies: rotate queries at the slot their key occupies (``True``, correct
        and what generate needs) or at the ``position_ids`` the caller passes (reproduces the
        official harness's positions).
    key_rotation : {"auto", "every_step", "incremental"}
        How stored keys get their rotation.

        * ``"every_step"``: keys are stored un-rotated and all of them are rotated at every step, as
          the official code does. Exact in any dtype; costs a rotation of the whole cache per layer and step.
        * ``"incremental"``: keys are stored rotated. A new key is rotated once; when a compaction
          moves kept keys of a slot-position policy to lower slots, they are rotated back by the
          shift (one rotation of the kept keys per compaction). Original-position policies never
          move a key, so this is exact for them; for slot policies each compaction adds one
          rounding of the key (about 1e-7 relative in float32).
        * ``"auto"`` (default): ``"incremental"`` for original-position policies, and for slot
          policies in float32/float64 with a RoPE whose position 0 is the identity; ``"every_step"``
          otherwise (in bf16/fp16 the roundings of repeated shifts add up; YaRN's scaled tables do not compose).
    quant : Quantizer, optional
        Store every layer quantized, in the store ``quant.new_store`` builds (:mod:`lacache_core.quantizers`): keys
        before RoPE, rotated at every step, or after it (``quant.key_order``); eviction runs on the quantized
        codes. Under ThinK each key keeps only its layer's chosen channels once it is quantized.
    read : Reader, optional
        Read each decode step's keys sparsely (:mod:`lacache_core.readers`; Quest): each query head attends only to the
        pages of slots whose key bounds score highest. The page metadata is held and counted in
        :meth:`kv_bytes`; :attr:`read_bytes` and :attr:`dense_read_bytes` count the bytes decode steps touch.
    """

    def __init__(self, policy: CachePolicy, num_layers: int, query_at_slot: bool = True,
                 key_rotation: str = "auto", quant: Optional[Quantizer] = None, read: Optional[Reader] = None):
        if not HAS_CACHE_CLASSES:
            raise RuntimeError("CompressedCache needs transformers >= 4.36; use ppl_legacy/ with tuple caches")
        if key_rotation not in KEY_ROTATIONS:
            raise ConfigError(f"make_cache.key_rotation must be one of {KEY_ROTATIONS}, got {key_rotation!r}")
        if key_rotation == "incremental" and not query_at_slot and policy.position_mode == "slot":
            raise ConfigError("make_cache.key_rotation incremental needs queries at their keys' slots "
                              "(make_cache.query_at_slot True)")
        if key_rotation == "every_step" and policy.prunes_channels:
            raise ConfigError(f"make_cache.key_rotation every_step cannot be used with make_cache.method {policy.name}: it prunes "
                              "channels of rotated keys, so keys must be stored rotated (incremental or auto)")
        if quant is not None:
            if quant.schedule == "reference" and not isinstance(policy, FullCache):
                raise ConfigError(f"{type(quant).__name__}.schedule reference splits keys and values at different tokens, as "
                                  f"KIVI's code does, so nothing can be evicted from it: use it with make_cache.method "
                                  f"full, not "
                                  f"{policy.name}")
            if policy.prunes_channels and quant.key_order != "post_rope":
                raise ConfigError(f"make_cache.method {policy.name} prunes channels of rotated keys: with make_cache.quant "
                                  f"{quant.method} use {type(quant).__name__}.key_order post_rope")
            if getattr(policy, "row_order", "position") != "position":  # ThinK's rows whole by order of score
                raise ConfigError(f"{type(policy).__name__}.row_order {policy.row_order} cannot be used with make_cache.quant: "
                                  "there the keys in "
                                  "the full-precision residual keep every channel, whatever their order")
            if quant.key_order == "post_rope":  # quantized as rotated, at original positions that never move
                if policy.position_mode != "original":
                    raise ConfigError(f"{type(quant).__name__}.key_order post_rope cannot be used with make_cache.method "
                                      f"{policy.name} at "
                                      "cache slots: kept keys move to other slots, and quantized keys cannot be "
                                      f"rotated again; use pre_rope or {type(policy).__name__}.key_positions original")
                if key_rotation == "every_step":
                    raise ConfigError(f"{type(quant).__name__}.key_order post_rope stores keys rotated: make_cache.key_rotation "
                                      "every_step "
                                      "cannot be used with it")
                key_rotation = "incremental"
            elif key_rotation == "incremental":
                raise ConfigError(f"make_cache.quant {quant.method} stores keys before RoPE and rotates them at every step: "
                                  "make_cache.key_rotation incremental cannot be used with it")
            else:
                key_rotation = "every_step"
        super().__init__()
        #: KV quantization (:class:`lacache_core.quantizers.Quantizer`), or ``None``: every layer is then a quantized store.
        self.quant = quant
        #: Sparse reads (:class:`lacache_core.readers.Reader`), or ``None``.
        self.read = read
        self._pages = [None] * num_layers  # Quest's page (min, max) of each layer's keys, as last computed
        self._pending_read = [None] * num_layers  # (KV bytes per own slot, first own slots), while pages await the mask
        #: Bytes of keys, values and page metadata that decode steps read (with ``read``), and that they would
        #: read densely: their ratio is the read saving.
        self.read_bytes = 0.0
        self.dense_read_bytes = 0.0
        self.metadata_read_bytes = 0.0  # the page metadata's part of read_bytes
        self.key_rotation = key_rotation
        self._stored_rotated: Optional[bool] = None  # resolved from "auto" at the first step
        self._next_position = 0  # original position of the first new token of the current forward pass
        policy.bind(num_layers)
        self.policy = policy
        self.num_layers = num_layers
        self.query_at_slot = query_at_slot
        self.peak_bytes = 0
        self._step_bytes = 0
        self._unread = [False] * num_layers
        self._arrived_rotated = [False] * num_layers
        # transformers >= 4.54 keeps per-layer objects, older versions two lists of tensors
        self._layered = isinstance(getattr(self, "layers", None), list)
        #: Layers held in a form of their own (heads of different lengths, pruned key channels); transformers'
        #: storage then holds a stand-in of the right length and no memory, and attention reads a dense view.
        self._stores = [None] * num_layers
        self._view = [None] * num_layers
        self._step_lengths = [None] * num_layers  # per-head lengths of the tensors the last attend() returned
        #: For a batch and a policy that scores tokens: one copy of the policy per row (row 0 is ``policy``), each
        #: choosing its row's slots from its row's scores; their choices are gathered in one operation per layer.
        self._rows: Optional[list] = None
        #: With per-row policies: per layer, ``LongTensor [b]``, the slots at the front of each row that hold no
        #: token of it (left padding, then what aligns rows that keep fewer slots); attention never sees them.
        self._fillers: Optional[list] = None
        self._tokens_in = 0  # tokens fed per row, padding included (the batch's positions)
        self._pads: Optional[torch.Tensor] = None  # a left-padded batch: each row's pad count ([b])
        self._step_fillers = [None] * num_layers  # (fillers [b], slots) of the tensors the last attend() returned
        self._step_slots = [0] * num_layers  # slots of the tensors the last attend() returned

    # -- storage access, across transformers' two DynamicCache layouts
    def _layer(self, i: int):
        if self._stores[i] is not None:
            return self._view[i] if self._view[i] is not None else self._stores[i].view()
        if self._layered:
            return self.layers[i].keys, self.layers[i].values
        return self.key_cache[i], self.value_cache[i]

    def _set_layer(self, i: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if self._layered:
            self.layers[i].keys, self.layers[i].values = key, value
        else:
            self.key_cache[i], self.value_cache[i] = key, value

    def kv_bytes(self) -> int:
        """Bytes held by keys and values of all layers (counted as stored: unpadded heads, pruned channels), and
        by Quest's page metadata."""
        return sum(self._layer_bytes(i) + self._page_bytes(i) for i in range(self.num_layers))

    def _page_bytes(self, i: int) -> int:
        pages = self._pages[i]
        return 0 if pages is None else sum(t.numel() * t.element_size() for t in pages)

    def _layer_bytes(self, i: int) -> int:
        if self._stores[i] is not None:
            return self._stores[i].nbytes()
        if i >= (len(self.layers) if self._layered else len(self.key_cache)):
            return 0
        key, value = self._layer(i)
        if key is None or not isinstance(key, torch.Tensor):
            return 0
        return key.numel() * key.element_size() + value.numel() * value.element_size()

    # -- layers held in a store of their own (lacache_core.storage)
    def head_lengths(self, i: int) -> Optional[torch.Tensor]:
        """Slots each KV head of layer ``i`` holds (``LongTensor [kv_heads]``), or ``None`` if all heads hold the same."""
        return None if self._stores[i] is None else self._stores[i].head_lengths()

    def _keep_in_store(self, i: int, store: LayerStore, like: torch.Tensor) -> None:
        """Hold layer ``i`` in ``store``, and in transformers' own storage a stand-in of the same length but no
        memory (its lengths and masks stay right)."""
        self._stores[i], self._view[i] = store, None
        self._sync_stand_in(i, like)

    def _sync_stand_in(self, i: int, like: torch.Tensor) -> None:
        stand_in = like.new_zeros(1, 1, 1, 1).expand(*self._stores[i].shape(), 1)
        self._set_layer(i, stand_in, stand_in)

    def ragged_step(self, i: int) -> bool:
        """Whether the tensors the last :meth:`attend` of layer ``i`` returned are a padded per-head view."""
        return self._step_lengths[i] is not None

    def rows_masked(self, i: int) -> bool:
        """Whether the rows of the last :meth:`attend` of layer ``i`` need the cache's own mask (fillers, padding)."""
        return self._step_fillers[i] is not None

    def head_mask(self, i: int, mask, query: torch.Tensor, sliding_window: Optional[int] = None):
        """The attention mask for this step of layer ``i`` (after :meth:`attend`): :meth:`_step_mask`, and with
        ``read`` only the slots of each query head's chosen pages (``[b, heads, q, n]``)."""
        mask = self._step_mask(i, mask, query, sliding_window)
        return mask if self._pending_read[i] is None else self._read_mask(i, mask, query)

    def _read_mask(self, i: int, mask, query: torch.Tensor):
        """``mask`` narrowed to Quest's pages (bool or additive like ``mask``; additive where it is ``None``), and
        the bytes this step reads counted: the page metadata, and of the KV bytes the share of slots that some
        query head of each KV head reads."""
        (slot_bytes, first, rotation), self._pending_read[i] = self._pending_read[i], None
        low, high = self._pages[i]
        n = self._step_slots[i]
        shift = self._slot_shift(i)
        if shift is not None:
            query = rotation.at(query, shift[:, None].expand(-1, query.shape[2]), inverse=True)
        seen = torch.ones(1, 1, 1, n, dtype=torch.bool, device=query.device) if mask is None else visible(mask)
        chosen = self.read.selected(query, low, high, seen[..., -n:], first)
        b, heads, q = chosen.shape[:3]
        per_kv_head = chosen.view(b, low.shape[1], heads // low.shape[1], q, n).any(2).any(2)  # [b, kv_heads, n]
        metadata = self._page_bytes(i)
        self.read_bytes += slot_bytes * int(per_kv_head.sum()) + metadata
        self.metadata_read_bytes += metadata
        if mask is None:
            return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~chosen, torch.finfo(query.dtype).min)
        if mask.dtype == torch.bool:
            return chosen
        return torch.where(chosen, mask[..., -n:], torch.finfo(mask.dtype).min)

    def _step_mask(self, i: int, mask, query: torch.Tensor, sliding_window: Optional[int] = None):
        """The attention mask for this step of layer ``i`` (after :meth:`attend`): ``mask`` itself, or, where the
        layer's heads differ in length, ``mask`` with each head's padding hidden (``[b, heads, q, n]``; bool
        or additive like ``mask``), or the cache's own mask (:meth:`_row_mask`) where rows need it or the layer
        has a ``sliding_window``: the model counts a window from the positions it is given, which
        ``generate`` advances by the tokens fed while the cache holds fewer slots."""
        if self._step_fillers[i] is not None or sliding_window:
            return self._row_mask(i, query, sliding_window)
        lengths = self._step_lengths[i]  # [kv_heads]: one row
        if lengths is None:
            return mask
        heads, q = query.shape[1], query.shape[2]
        n = int(lengths.max())
        pad = torch.arange(n)[None, :] < (n - lengths)[:, None]  # [kv_heads, n]: padding slots
        pad = pad.repeat_interleave(heads // lengths.shape[0], 0)[None, :, None, :].to(query.device)
        if q > 1:  # the new tokens' causal block (the last q slots)
            rows = torch.arange(n - q, n, device=query.device)[:, None]
            pad = pad | (torch.arange(n, device=query.device)[None, :] > rows)[None, None]
        if mask is None:
            return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(pad, torch.finfo(query.dtype).min) \
                .expand(query.shape[0], heads, q, n)
        mask = mask[..., -n:] if mask.shape[-1] >= n else mask
        if mask.dtype == torch.bool:
            return mask & ~pad
        return torch.where(pad, torch.finfo(mask.dtype).min, mask)

    def _row_mask(self, i: int, query: torch.Tensor, sliding_window: Optional[int] = None) -> torch.Tensor:
        """``[b, 1 | heads, q, n]`` additive: each row's filler slots (and a head's padding, where heads differ in
        length) hidden, the new tokens causal, and with a ``sliding_window`` only the keys fewer than that many
        slots before the query (the model's own mask counts the window in cache slots too). It replaces the
        model's mask, which knows the padding of the input but not where compaction has moved each row's tokens."""
        b, heads, q, device = *query.shape[:3], query.device
        n = self._step_slots[i]
        first = self._first_slots(i)  # the first slot each row (and head) may see: [b, 1] or [b | 1, kv_heads]
        first = torch.zeros(b, 1, dtype=torch.long) if first is None else first.expand(b, -1)
        if first.shape[-1] > 1:  # heads of different lengths: [b, heads]
            first = first.repeat_interleave(heads // first.shape[-1], -1)
        slots = torch.arange(n, device=device)
        allowed = slots[None, None, None, :] >= first.to(device)[:, :, None, None]  # [b, 1 | heads, 1, n]
        query_slots = torch.arange(n - q, n, device=device)[:, None]
        allowed = allowed & (slots[None, :] <= query_slots)  # [b, ., q, n]
        if sliding_window:
            allowed = allowed & (slots[None, :] > query_slots - sliding_window)
        return torch.zeros((), dtype=query.dtype, device=device).masked_fill(~allowed, torch.finfo(query.dtype).min)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # A layer written twice without being read went through an unpatched attention: its keys were
        # rotated by the model, and the next step would silently mix rotated and un-rotated keys.
        if self._unread[layer_idx]:
            raise RuntimeError(
                "this model's attention is not position-shifted: call lacache_core.enable_position_shift(model) "
                "before running it with a CompressedCache"
            )
        self._unread[layer_idx] = True
        if self.quant is not None:
            if self._stores[layer_idx] is None:
                super().update(key_states, value_states, layer_idx, *args, **kwargs)  # the layer's place in the list
                self._keep_in_store(layer_idx, self.quant.new_store(key_states, value_states), key_states)
            else:
                self._stores[layer_idx].append(key_states, value_states)
                self._sync_stand_in(layer_idx, key_states)
            self._view[layer_idx] = self._stores[layer_idx].view()  # this step's tokens in full precision
            return self._view[layer_idx]
        store = self._stores[layer_idx]
        if store is not None:
            store.append(key_states, value_states)
            self._view[layer_idx] = store.view()  # this step's attention input, dropped after it
            self._sync_stand_in(layer_idx, key_states)
            return self._view[layer_idx]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def attend(self, layer_idx: int, query: torch.Tensor, rotation, scaling: float,
               position_ids: Optional[torch.Tensor] = None):
        """The attention's one call: rotated query, keys and values for layer ``layer_idx``.

        Parameters
        ----------
        query : ``[b, heads, q, d]``, the newest ``q`` tokens' (rotated already if :meth:`position_embeddings`
            gave the model a rotation for this layer, else un-rotated).
        rotation : :class:`lacache_core.rope.Rotation` of the model.
        scaling : the attention's softmax scale.
        position_ids : ``[b, q]``, the caller's positions (used only when ``query_at_slot`` is off).

        Returns
        -------
        ``(query, key, value)``: query ``[b, heads, q, d]`` and keys ``[b, kv_heads, n, d]`` rotated,
        values ``[b, kv_heads, n, d]``, all ``n`` slots including the new ones. The layer is compacted
        for the next step after this call; the tensors returned are those of this step.
        """
        key, value = self._layer(layer_idx)
        self._step_lengths[layer_idx] = self.head_lengths(layer_idx)
        self._unread[layer_idx] = False
        n, q_len = key.shape[-2], query.shape[-2]
        self._step_slots[layer_idx] = n
        if layer_idx == 0:
            self._tokens_in += q_len
        policy = self.policy
        rows = self._row_policies(key.shape[0])
        row_fillers = None if rows is None else self._fillers[layer_idx]  # [b], before this step's compaction
        fillers = None if rows is None else row_fillers.tolist()
        for j, row_policy in enumerate(rows or [policy]):
            row_policy.record(layer_idx, n - (fillers[j] if rows else 0), key.device)
        slot = policy.position_mode == "slot"
        if self._arrived_rotated[layer_idx]:  # rotated by the model itself (position_embeddings)
            self._arrived_rotated[layer_idx] = False
            keys = key
        else:
            seen = policy.seen if rows is None else self._tokens_in
            first = n - q_len if slot else seen - q_len  # position of the first new token
            per_row = rows is not None and not slot and not self.stores_rotated(rotation, key)
            if per_row:  # each row at its own original positions: its tokens count from its first after its padding
                pads = self._pads if self._pads is not None else torch.zeros(len(rows), dtype=torch.long)
                at = (self._tokens_in - q_len - pads)[:, None] + torch.arange(q_len)
                query = rotation.at(query, at.clamp_min(0), limit=self._tokens_in)
            elif slot and not (self.query_at_slot or position_ids is None):
                query = rotation.at(query, position_ids)
            else:
                query = rotation.from_slot(query, first)
            if self.stores_rotated(rotation, key):
                new = rotation.from_slot(key[..., n - q_len:, :], first)
                key = keys = self._rotate_new(layer_idx, key, value, q_len, new)
            elif slot:
                keys = rotation.from_slot(key, 0)
            elif per_row:
                keys = rotation.at(key, self._row_positions(rows, layer_idx, n, key.shape[1]), per_head=True,
                                   limit=self._tokens_in)
            else:
                held = policy.layer_positions(layer_idx)
                keys = rotation.at(key, held, per_head=held.dim() == 2, limit=policy.seen)
        if rows:
            for j, row_policy in enumerate(rows):
                real = min(q_len, n - fillers[j])  # the new tokens of row j that are not padding
                row_policy.observe(layer_idx, query[j:j + 1, :, q_len - real:], keys[j:j + 1, :, fillers[j]:], scaling)
        elif policy.observes:
            policy.observe(layer_idx, query, keys, scaling)
        if layer_idx == 0:
            self._step_bytes = 0
        self._step_bytes += self._layer_bytes(layer_idx) + self._page_bytes(layer_idx)
        if layer_idx == self.num_layers - 1:
            self.peak_bytes = max(self.peak_bytes, self._step_bytes)
        self._view[layer_idx] = None
        # after padding, the model's mask says where the input's pads were, not where compaction moved each row's
        # tokens; without padding it is right while no row holds fillers
        own_mask = rows is not None and (self._pads is not None or any(fillers) or self._stores[layer_idx] is not None)
        self._step_fillers[layer_idx] = (row_fillers, n) if own_mask else None
        if self.read is not None:
            self._plan_read(layer_idx, keys, q_len, rotation)
        if self.quant is not None:  # eviction on the codes, then quantization
            self._settle_quantized(layer_idx, key, value, rows, n, row_fillers)
            return query, keys, value
        if rows is not None and (policy.ragged or policy.prunes_channels):
            self._rows_into_stores(rows, layer_idx, key, value, n)
            return query, keys, value
        keep = policy.settle(layer_idx, n) if rows is None else self._rows_keep(rows, layer_idx, n, key.shape[1])
        if keep is not None and self._stores[layer_idx] is not None:
            raise RuntimeError(f"{policy.name}: a layer held in a store of its own cannot be compacted again")
        kept_key, kept_value = key, value
        if isinstance(keep, list):  # per-head lengths (AdaKV, HeadKV)
            self._keep_in_store(layer_idx, PerHeadStore(key, value, keep), key)
        elif keep is not None:
            merged = self._merged_values(layer_idx, keep, value, rows, fillers) if policy.merges_values else value
            kept_key, kept_value = gather_layer(key, merged, keep)  # the stored keys, rotated or not
            if self._stored_rotated and slot:  # kept keys move to slots 0 .. n_keep - 1 (after a row's fillers)
                kept_key = self._moved_keys(kept_key, keep, rotation, n, rows, layer_idx)
            self._set_layer(layer_idx, kept_key, kept_value)
        if policy.prunes_channels and self._stores[layer_idx] is None:  # ThinK: after the token choice
            channels = policy.channel_keep(layer_idx, kept_key)
            if channels is not None:
                store = PrunedChannelStore(kept_key, kept_value, channels, policy.unpruned(layer_idx))
                self._keep_in_store(layer_idx, store, key)
        if policy.merges_layers and policy.closes_pair(layer_idx) and self._stores[layer_idx] is None:
            # MiniCache, after the prompt's pass: this layer and the one before it share one merged store
            for i, store in enumerate(policy.merge_pair(self._layer(layer_idx - 1), (key, value), row_fillers)):
                self._keep_in_store(layer_idx - 1 + i, store, key)
        return query, keys, value

    def _moved_keys(self, kept_key: torch.Tensor, keep: torch.Tensor, rotation, n: int, rows, layer_idx: int):
        """Keys stored rotated at their slots, gathered by ``keep``, rotated to the slots they now hold. Alone a key
        only moves down; in a batch a row that now keeps fewer slots than the longest gains filler slots in
        front, so its keys can move up (fillers are not rotated)."""
        place = torch.arange(keep.shape[-1], device=kept_key.device)
        shift = keep.to(kept_key.device) - place
        if rows is not None:
            fillers = self._fillers[layer_idx].to(kept_key.device)  # after this step's choice
            shift = torch.where(place < fillers.view(-1, *(1,) * (shift.dim() - 1)), 0, shift)
        per_head = shift.dim() >= 2
        kept_key = rotation.at(kept_key, shift.clamp_min(0), per_head=per_head, limit=n, inverse=True)
        up = (-shift).clamp_min(0)
        return rotation.at(kept_key, up, per_head=per_head, limit=n) if bool(up.any()) else kept_key

    @staticmethod
    def _row_positions(rows: list, layer_idx: int, n: int, kv_heads: int) -> torch.Tensor:
        """``LongTensor [b, kv_heads, n]``: each row's original positions of its slots (its own after its fillers,
        which read position 0 and are masked)."""
        out = []
        for row in rows:
            held = row.layer_positions(layer_idx)
            held = held.expand(kv_heads, -1) if held.dim() == 1 else held
            out.append(torch.nn.functional.pad(held, (n - held.shape[-1], 0)))
        return torch.stack(out)

    def _settle_quantized(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, rows, n: int,
                          row_fillers) -> None:
        """The end of a step of a quantized layer (``key``, ``value``: this step's view, keys as stored): the
        policy's choice applied to the codes, then the residual's oldest tokens quantized. In a batch of rows each
        row holds its own tokens in a quantized store of its own (:class:`RowStores`), chosen, evicted and
        quantized as alone; the rows are split on the first pass, before anything is quantized."""
        policy, store = self.policy, self._stores[layer_idx]
        if rows is None:
            store = self._settle_store(layer_idx, policy, store, policy.settle(layer_idx, n), value)
        else:
            fillers = row_fillers.tolist()
            if not isinstance(store, RowStores):
                store = RowStores([self.quant.new_store(key[j:j + 1, :, f:], value[j:j + 1, :, f:])
                                   for j, f in enumerate(fillers)])
            store.stores = [self._settle_store(layer_idx, row, part, row.settle(layer_idx, n - f), value[j:j + 1, :, f:])
                            for j, (row, part, f) in enumerate(zip(rows, store.stores, fillers))]
            self._fillers[layer_idx] = store.shape()[2] - store.row_lengths()
        self._keep_in_store(layer_idx, store, key)
        one = store.stores[0] if isinstance(store, RowStores) else store  # every row's store is of one kind
        merging = policy.merges_layers and isinstance(one, QuantizedStore)  # MiniCache's prompt pass
        if merging and policy.closes_pair(layer_idx):  # both layers still whole: merged, then quantized once
            pair = policy.merge_pair(self._layer(layer_idx - 1), (key, value), row_fillers, quant=self.quant)
            for i, merged_store in enumerate(pair):
                self._keep_in_store(layer_idx - 1 + i, merged_store, key)
        elif not (merging and policy.closes_pair(layer_idx + 1)):  # a pair's earlier layer waits whole for the merge
            store.compress()

    def _settle_store(self, layer_idx: int, policy: CachePolicy, store: LayerStore, keep, value: torch.Tensor):
        """One quantized store (a layer, or one row of it) after ``policy`` chose ``keep`` among its slots
        (``value``: their values as attention read them); returns the store, a new one where heads part."""
        if isinstance(keep, list):  # AdaKV, HeadKV: a store per head
            return PerHeadQuantStore.from_store(store, keep)
        if keep is not None and policy.merges_values:  # CaM: merged values held whole
            merged = policy.merge_values(layer_idx, keep, value)
            store.rewrite_values(merged, (merged != value).any(-1))
        if keep is not None:
            store.gather(keep)
        if policy.prunes_channels and store.channels is None and not store.key_codes.shape[2]:
            channels = policy.channel_keep(layer_idx, store.view()[0])  # ThinK: after the token choice
            if channels is not None:
                store.prune_channels(channels)
        return store

    def _merged_values(self, layer_idx: int, keep, value: torch.Tensor, rows, fillers) -> torch.Tensor:
        """CaM: ``value`` (``[b, kv_heads, n, d]``) with the evicted values merged into kept ones, as a new tensor,
        each row's by its own policy over its own slots (after its fillers)."""
        parts = [(value[j:j + 1, :, :f], row.merge_values(layer_idx, keep, value[j:j + 1, :, f:]))
                 for j, (row, f) in enumerate(zip(rows or [self.policy], fillers or [0]))]
        return torch.cat([torch.cat(part, 2) for part in parts])

    def _plan_read(self, layer_idx: int, keys: torch.Tensor, q_len: int, rotation) -> None:
        """Quest, before the kernel: a decode step's page bounds of the rotated ``keys`` (the pages are chosen
        in :meth:`head_mask`, once the step's mask is known); prefill and the dense layers read every slot."""
        if q_len != 1:
            return
        # bytes are counted per own slot of each row and head: a row's filler slots and a head's padding are neither
        # read by Quest nor part of a dense read of that row (stores hold own slots only; a dense padded layer all n)
        b, kv_heads, n = keys.shape[0], keys.shape[1], keys.shape[2]
        first = self._first_slots(layer_idx)
        first = None if first is None else first.expand(b, kv_heads)
        own = b * kv_heads * n if first is None else int((n - first).sum())
        stored = own if first is not None and self._stores[layer_idx] is not None else b * kv_heads * n
        slot_bytes = self._layer_bytes(layer_idx) / stored
        self.dense_read_bytes += slot_bytes * own
        if layer_idx < self.read.dense_layers:
            self.read_bytes += slot_bytes * own
            return
        shift = self._slot_shift(layer_idx)
        if shift is not None:
            keys = rotation.at(keys, shift[:, None].expand(b, n), inverse=True)
        self._pages[layer_idx] = self.read.bounds(keys, first)
        self._pending_read[layer_idx] = slot_bytes, first, rotation

    def _slot_shift(self, i: int) -> Optional[torch.Tensor]:
        """Quest under a slot method in a padded batch: each row's filler slots (``[b]``), by which its keys and
        query are rotated past the slots it would have alone. A page's bound is per channel, which a rotation of
        both sides changes, so pages are scored at the row's own slots (``None`` where no row has fillers)."""
        first = self._first_slots(i)
        if self.policy.position_mode != "slot" or first is None or not bool(first.any()):
            return None
        return first[:, 0]

    def _first_slots(self, i: int) -> Optional[torch.Tensor]:
        """The first slot of each row's (and, where heads differ in length, each head's) own tokens in the tensors
        the last :meth:`attend` of layer ``i`` returned, past filler slots and a head's padding: ``[b, 1]``,
        ``[b | 1, kv_heads]``, or ``None`` (slot 0 everywhere). CPU."""
        lengths, fillers = self._step_lengths[i], self._step_fillers[i]  # lengths: [b, kv_heads], [kv_heads] or None
        if lengths is None:
            return None if fillers is None else fillers[0][:, None]
        first = self._step_slots[i] - lengths
        return first if first.dim() == 2 else first[None]

    @classmethod
    def for_rows(cls, policies: list, num_layers: int, query_at_slot: bool = True,
                 key_rotation: str = "auto", quant: Optional[Quantizer] = None,
                 read: Optional[Reader] = None) -> "CompressedCache":
        """One cache for a batch whose rows have policies of their own: one method, its settings per row (a
        budget sized to each row's prompt, sinks by each prompt's length). Row ``j`` of every forward pass is
        compacted by ``policies[j]``; the arguments are as for the constructor."""
        first = policies[0]
        if any(type(p) is not type(first) for p in policies):
            raise ConfigError("the rows of a batch must use one method: " + ", ".join(sorted({p.name for p in policies})))
        cache = cls(first, num_layers, query_at_slot=query_at_slot, key_rotation=key_rotation, quant=quant, read=read)
        if len(policies) > 1:
            for p in policies[1:]:
                p.bind(num_layers)
            cache._rows = list(policies)
            cache._fillers = [torch.zeros(len(policies), dtype=torch.long) for _ in range(num_layers)]
        return cache

    def batch_state(self) -> dict:
        """What a batch of rows with policies of their own needs to continue (``{}`` without such rows): the
        other rows' policy states, each layer's filler slots per row, and the tokens fed."""
        if self._rows is None:
            return {}
        return {"rows": [p.state_dict() for p in self._rows[1:]], "fillers": [f.clone() for f in self._fillers],
                "tokens_in": self._tokens_in}

    def restore_batch(self, state: dict) -> None:
        """Continue the batch :meth:`batch_state` saved (row 0's policy is this cache's own, restored with it)."""
        if not state:
            return
        rows = [policy_from_state(saved) for saved in state["rows"]]
        for p in rows:
            p.bind(self.num_layers)
        self._rows = [self.policy] + rows
        self._fillers = [f.clone() for f in state["fillers"]]
        self._tokens_in = state["tokens_in"]

    def _row_policies(self, batch: int) -> Optional[list]:
        """The per-row policies of a batch, for a policy that scores tokens (``None``: one policy serves every row,
        since a position-only choice depends on the slot count alone, the same in every row)."""
        if self._rows is None and (batch == 1 or not self.policy.observes) and self._fillers is None:
            return None
        if self._rows is None:
            if self.policy.seen:
                raise RuntimeError("a cache used at batch size 1 cannot continue at a larger batch; use a fresh cache")
            self._rows = [self.policy] + [copy.deepcopy(self.policy) for _ in range(batch - 1)]
            if self._fillers is None:
                self._fillers = [torch.zeros(batch, dtype=torch.long) for _ in range(self.num_layers)]
        elif len(self._rows) != batch:
            raise RuntimeError(f"the batch changed from {len(self._rows)} to {batch} rows; use a fresh cache")
        return self._rows

    def _rows_keep(self, rows: list, layer: int, n: int, kv_heads: int) -> Optional[torch.Tensor]:
        """Each row's choice for ``layer``, as one ``[b, kv_heads, n_keep]`` index (``None``: every row keeps all).

        A row's policy chooses among its own tokens (the slots after its fillers). Rows that keep fewer
        slots than the longest are aligned with filler slots at the front, which attention never sees.
        """
        fillers = self._fillers[layer]
        keeps = [row.settle(layer, n - int(f)) for row, f in zip(rows, fillers)]
        if all(k is None for k in keeps):
            return None
        device = next(k for k in keeps if k is not None).device
        slots = [torch.arange(int(f), n, device=device).expand(kv_heads, -1) if k is None
                 else k.to(device).expand(kv_heads, k.shape[-1]) + int(f) for k, f in zip(keeps, fillers)]
        width = max(row.shape[-1] for row in slots)
        self._fillers[layer] = torch.tensor([width - row.shape[-1] for row in slots])
        return torch.stack([torch.nn.functional.pad(row, (width - row.shape[-1], 0)) for row in slots])

    def _rows_into_stores(self, rows: list, layer: int, key: torch.Tensor, value: torch.Tensor, n: int) -> None:
        """Each row's choice for ``layer`` under a method that holds layers in a store of its own (heads of
        different lengths, pruned key channels): a store per row among its own tokens, held as one
        :class:`RowStores` (rows aligned by filler slots at the front, as :meth:`_rows_keep` does)."""
        fillers = self._fillers[layer].tolist()
        keeps = [row.settle(layer, n - f) for row, f in zip(rows, fillers)]
        if self._stores[layer] is not None:
            if any(k is not None for k in keeps):
                raise RuntimeError(f"{self.policy.name}: a layer held in a store of its own cannot be compacted again")
            return
        stores = []
        for j, (row, keep, f) in enumerate(zip(rows, keeps, fillers)):
            k, v = key[j:j + 1, :, f:], value[j:j + 1, :, f:]
            if isinstance(keep, list):  # per-head lengths (AdaKV, HeadKV)
                stores.append(PerHeadStore(k, v, keep))
                continue
            k, v = gather_layer(k, v, keep) if keep is not None else (k.clone(), v.clone())
            channels = row.channel_keep(layer, k) if row.prunes_channels else None  # ThinK: after the token choice
            stores.append(DenseStore(k, v) if channels is None else PrunedChannelStore(k, v, channels, row.unpruned(layer)))
        store = RowStores(stores)
        self._fillers[layer] = store.shape()[2] - store.row_lengths()
        self._keep_in_store(layer, store, key)

    def note_padding(self, mask: torch.Tensor) -> None:
        """Read the left padding of a batch's first forward pass from its 4D attention mask (layer 0's).

        A row's pad slots are those whose own query cannot see them (causal and sliding-window masks always
        let a token see itself); they must be a prefix of the row.
        """
        if self._tokens_in or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            return
        q, n = mask.shape[-2], mask.shape[-1]
        own = own_key_visible(mask)  # [b, q]
        if bool(own.all()):
            return
        pads = (~own).sum(-1).cpu()
        prefix = torch.arange(q)[None, :] < pads[:, None]
        if n != q or not torch.equal(~own.cpu(), prefix):
            raise ConfigError("only left padding of the first forward pass is supported with a compressed cache "
                              "(pad tokens before each row's first token)")
        self._fillers = [pads.clone() for _ in range(self.num_layers)]
        self._pads = pads

    def row_positions(self, row: int):
        """Original positions held for batch row ``row`` (as :meth:`kept_positions`)."""
        return self.policy.positions if self._rows is None else self._rows[row].positions

    def position_embeddings(self, layer_idx: int, embeddings, rotation):
        """The ``(cos, sin)`` the model's attention should use for its new query and keys.

        Asked by the position-shift pre-hook before each attention forward. For keys stored
        un-rotated, an identity rotation; for keys stored rotated, the rotation to the new tokens'
        positions (their slots, or their original positions), so that the model's own RoPE code
        rotates them once and :meth:`attend` has nothing left to rotate.
        """
        if layer_idx == 0:  # rows of a batch count their own tokens; positions count the batch's, padding included
            self._next_position = self.policy.seen if self._rows is None else self._tokens_in
        if not self.stores_rotated(rotation, embeddings[0]):
            return rotation.identity(embeddings)
        self._arrived_rotated[layer_idx] = True
        slot = self.policy.position_mode == "slot"
        if slot:
            return rotation.embeddings(self.get_seq_length(layer_idx), embeddings)
        if self._pads is not None:  # a left-padded batch: each row's tokens at their positions in that row
            return rotation.embeddings_rows(self._next_position, self._pads, embeddings)
        return rotation.embeddings(self._next_position, embeddings)

    def stores_rotated(self, rotation, like: torch.Tensor) -> bool:
        """Whether stored keys carry their rotation (``key_rotation`` resolved on the first call)."""
        if self._stored_rotated is None:
            mode = self.key_rotation
            if mode == "auto":
                exact = self.policy.position_mode == "original"
                accurate = like.dtype in (torch.float32, torch.float64) and rotation.composes(like)
                at_slot = self.query_at_slot or self.policy.position_mode == "original"
                mode = "incremental" if at_slot and (exact or accurate) else "every_step"
            self._stored_rotated = mode == "incremental"
        return self._stored_rotated

    def _rotate_new(self, layer_idx: int, key, value, q_len: int, rotated: torch.Tensor) -> torch.Tensor:
        """Store the rotated new keys in place of the un-rotated ones ``update`` appended; all keys, rotated."""
        n = key.shape[-2]
        if self._stores[layer_idx] is not None:  # the view is a copy: write the rotation into the store too
            self._stores[layer_idx].write_newest_keys(rotated)
            key = key.clone()
            key[..., n - q_len:, :] = rotated
            return key
        if key.requires_grad or rotated.requires_grad:  # in-place writes would break autograd
            key = torch.cat([key[..., :n - q_len, :], rotated], -2)
            self._set_layer(layer_idx, key, value)
        else:
            key[..., n - q_len:, :] = rotated
        return key

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


def make_cache(method: str, model_or_config, query_at_slot: bool = True, key_rotation: str = "auto",
               quant: Optional[Quantizer] = None, read: Optional[Reader] = None, **settings) -> CompressedCache:
    """Build a :class:`CompressedCache` for ``method`` sized to a model (or its config).

    Example
    -------
    >>> enable_position_shift(model)
    >>> cache = make_cache("lacache", model, cache_size=256, span=8, overlap=4)
    >>> model.generate(input_ids, past_key_values=cache, max_new_tokens=4096)
    """
    config = getattr(model_or_config, "config", model_or_config)
    policy = build_policy(method, **settings)
    return CompressedCache(policy, config.num_hidden_layers, query_at_slot=query_at_slot, key_rotation=key_rotation,
                           quant=quant, read=read)


def make_row_cache(method: str, model_or_config, row_settings: list, query_at_slot: bool = True,
                   key_rotation: str = "auto", quant: Optional[Quantizer] = None,
                   read: Optional[Reader] = None) -> CompressedCache:
    """A :class:`CompressedCache` for a batch whose rows differ in their settings (``row_settings[j]`` for row
    ``j``, as :func:`make_cache`'s keywords), e.g. a budget that is a fraction of each row's prompt.

    Example
    -------
    >>> cache = make_row_cache("lacache", model, [dict(cache_size=512), dict(cache_size=300)])
    >>> model.generate(left_padded_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64)
    """
    layers = getattr(model_or_config, "config", model_or_config).num_hidden_layers
    same = all(s == row_settings[0] for s in row_settings)  # one policy serves rows that score nothing
    policies = []
    for settings in row_settings[:1] if same else row_settings:
        try:  # an impossible budget names its numbers
            policy = build_policy(method, **settings)
            policy.bind(layers)
        except ConfigError as err:
            raise ConfigError(f"{err} (cache_size {settings.get('cache_size')}, start_size "
                              f"{settings.get('start_size')}, {layers} layers)") from None
        policies.append(policy)
    return CompressedCache.for_rows(policies, layers, query_at_slot=query_at_slot, key_rotation=key_rotation,
                                    quant=quant, read=read)


def prefill(model, input_ids: torch.Tensor, cache, chunk_size: Optional[int] = None, **inputs) -> torch.Tensor:
    """Feed a prompt into ``cache``, whole or ``chunk_size`` tokens at a time; returns the last logits ``[b, vocab]``.

    With a :class:`CompressedCache` of a decode-time method the policy compacts between chunks, so
    peak memory depends on the budget and the chunk, not on the prompt length. Prefill-time
    methods (SnapKV, ...) compress after the first forward pass, so they need the whole prompt at
    once (``chunk_size=None``). ``inputs`` (a left-padded batch's ``attention_mask`` and
    ``position_ids``) go to the model with the whole prompt.
    """
    import inspect

    from .errors import ConfigError

    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"prefill.chunk_size must be >= 1, got {chunk_size}")
    if chunk_size is not None and isinstance(cache, CompressedCache) and cache.policy.prefill_only:
        raise ConfigError(f"prefill.chunk_size cannot be used with make_cache.method {cache.policy.name}: it compresses the "
                          "whole prompt once")
    if chunk_size is not None and inputs:
        raise ConfigError("prefill.chunk_size cannot feed a padded batch: its rows would be cut at different places "
                          "of their own prompts; use batch size 1 or the whole prompt")
    params = inspect.signature(model.forward).parameters
    # only the last position's logits are needed; a [prompt, vocab] logits tensor would dominate memory
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else (
        {"num_logits_to_keep": 1} if "num_logits_to_keep" in params else {})
    step = chunk_size or input_ids.shape[1]
    logits = None
    for start in range(0, input_ids.shape[1], step):
        out = model(input_ids[:, start:start + step], use_cache=True, **with_cache(cache), **extra, **inputs)
        logits = out.logits[:, -1]
    return logits

"""The store stage: after the kernel has read a step, the policy's choice applied to the layer's storage.

Every way a layer is compacted lives here: a dense layer gathered (or its frame moved,
:meth:`KeyPlacement.compact_in_place`), a layer that moves into a store of its own (heads of different
lengths, pruned key channels, a merged pair of layers), a quantized layer evicted on its codes, and a batch
whose rows choose for themselves.
"""
from __future__ import annotations

import torch

from ..policies.base import gather_layer, kept_runs
from ..quant import PerHeadQuantStore, QuantizedStore
from ..storage import DenseStore, PerHeadStore, PrunedChannelStore, RowStores


def settle(cache, step) -> None:
    """Compact layer ``step.layer`` of ``cache`` for the next step."""
    policy, layer, key, value, rows, n = cache.policy, step.layer, step.stored_key, step.value, step.rows, step.n
    if cache.quant is not None:  # eviction on the codes, then quantization
        return settle_quantized(cache, step)
    if rows is not None and (policy.ragged or policy.prunes_channels):
        return rows_into_stores(cache, step)
    keep = policy.settle(layer, n) if rows is None else cache.rows.keep(layer, n, key.shape[1])
    if keep is not None and cache._stores[layer] is not None:
        raise RuntimeError(f"{policy.name}: a layer held in a store of its own cannot be compacted again")
    kept_key, kept_value = key, value
    if isinstance(keep, list):  # per-head lengths (AdaKV, HeadKV)
        cache._keep_in_store(layer, PerHeadStore(key, value, keep), key)
    elif keep is not None:
        kept_key, kept_value = dense_keep(cache, step, keep)
        cache._set_layer(layer, kept_key, kept_value)
    if policy.prunes_channels and cache._stores[layer] is None:  # ThinK: after the token choice
        channels = policy.channel_keep(layer, kept_key)
        if channels is not None:
            store = PrunedChannelStore(kept_key, kept_value, channels, policy.unpruned(layer))
            cache._keep_in_store(layer, store, key)
    if policy.merges_layers and policy.closes_pair(layer) and cache._stores[layer] is None:
        # MiniCache, after the prompt's pass: this layer and the one before it share one merged store
        fillers = None if step.rows is None else step.fillers_before
        for i, store in enumerate(policy.merge_pair(cache._stored(layer - 1), (key, value), fillers)):
            cache._keep_in_store(layer - 1 + i, store, key)


def dense_keep(cache, step, keep: torch.Tensor):
    """A dense layer's kept ``(key, value)``: the frame moved where only older slots go and nothing needs the
    step's tensors any more, else gathered (CaM's merged values first), keys of a slot policy stored rotated
    rotated to the slots they now hold."""
    policy, placement, key, value, rows = cache.policy, cache.placement, step.stored_key, step.value, step.rows
    # a sparse read scores pages by per-channel bounds, which a rotation of the frame would change
    movable = placement.can_move_frame() and rows is None and keep.dim() == 1 and not policy.merges_values and \
        cache.read is None
    if movable and not (key.requires_grad or value.requires_grad):  # in-place writes would break autograd
        runs = policy.kept_runs(step.layer)  # read from the plan once per compaction where the policy has one
        oldest, newest = kept_runs(keep[None], step.n)[0].tolist() if runs is None else runs
        if newest:
            return placement.compact_in_place(step.layer, key, value, keep, newest, oldest)
    merged = merged_values(cache, step, keep) if policy.merges_values else value
    kept_key, kept_value = gather_layer(key, merged, keep)  # the stored keys, rotated or not
    if placement.rotated and placement.slot:  # kept keys move to slots 0 .. n_keep - 1 (after a row's fillers)
        fillers = None if rows is None else cache.rows.fillers[step.layer]  # after this step's choice
        kept_key = placement.moved_keys(kept_key, keep, step.n, fillers)
    return kept_key, kept_value


def merged_values(cache, step, keep) -> torch.Tensor:
    """CaM: the step's values (``[b, kv_heads, n, d]``) with the evicted values merged into kept ones, as a new
    tensor, each row's by its own policy over its own slots (after its fillers)."""
    value = step.value
    fillers = [0] if step.rows is None else step.fillers_before.tolist()
    parts = [(value[j:j + 1, :, :f], row.merge_values(step.layer, keep, value[j:j + 1, :, f:]))
             for j, (row, f) in enumerate(zip(step.rows or [cache.policy], fillers))]
    return torch.cat([torch.cat(part, 2) for part in parts])


def rows_into_stores(cache, step) -> None:
    """Each row's choice under a method that holds layers in a store of its own (heads of different lengths,
    pruned key channels): a store per row among its own tokens, held as one :class:`RowStores` (rows aligned by
    filler slots at the front, as :meth:`BatchRows.keep` does)."""
    layer, key, value, n = step.layer, step.stored_key, step.value, step.n
    fillers = cache.rows.fillers[layer].tolist()
    keeps = [row.settle(layer, n - f) for row, f in zip(step.rows, fillers)]
    if cache._stores[layer] is not None:
        if any(k is not None for k in keeps):
            raise RuntimeError(f"{cache.policy.name}: a layer held in a store of its own cannot be compacted again")
        return
    stores = []
    for j, (row, keep, f) in enumerate(zip(step.rows, keeps, fillers)):
        k, v = key[j:j + 1, :, f:], value[j:j + 1, :, f:]
        if isinstance(keep, list):  # per-head lengths (AdaKV, HeadKV)
            stores.append(PerHeadStore(k, v, keep))
            continue
        k, v = gather_layer(k, v, keep) if keep is not None else (k.clone(), v.clone())
        channels = row.channel_keep(layer, k) if row.prunes_channels else None  # ThinK: after the token choice
        stores.append(DenseStore(k, v) if channels is None else PrunedChannelStore(k, v, channels, row.unpruned(layer)))
    store = RowStores(stores)
    cache.rows.fillers[layer] = store.shape()[2] - store.row_lengths()
    cache._keep_in_store(layer, store, key)


def settle_quantized(cache, step) -> None:
    """The end of a step of a quantized layer: the policy's choice applied to the codes, then the residual's oldest
    tokens quantized. In a batch of rows each row holds its own tokens in a quantized store of its own
    (:class:`RowStores`), chosen, evicted and quantized as alone; the rows are split on the first pass, before
    anything is quantized."""
    policy, layer, key, value, rows, n = cache.policy, step.layer, step.stored_key, step.value, step.rows, step.n
    store = cache._stores[layer]
    if rows is None:
        store = settle_store(policy, layer, store, policy.settle(layer, n), value)
    else:
        fillers = step.fillers_before.tolist()
        if not isinstance(store, RowStores):
            store = RowStores([cache.quant.new_store(key[j:j + 1, :, f:], value[j:j + 1, :, f:])
                               for j, f in enumerate(fillers)])
        store.stores = [settle_store(row, layer, part, row.settle(layer, n - f), value[j:j + 1, :, f:])
                        for j, (row, part, f) in enumerate(zip(rows, store.stores, fillers))]
        cache.rows.fillers[layer] = store.shape()[2] - store.row_lengths()
    cache._keep_in_store(layer, store, key)
    one = store.stores[0] if isinstance(store, RowStores) else store  # every row's store is of one kind
    merging = policy.merges_layers and isinstance(one, QuantizedStore)  # MiniCache's prompt pass
    if merging and policy.closes_pair(layer):  # both layers still whole: merged, then quantized once
        fillers = None if rows is None else step.fillers_before
        pair = policy.merge_pair(cache._stored(layer - 1), (key, value), fillers, quant=cache.quant)
        for i, merged_store in enumerate(pair):
            cache._keep_in_store(layer - 1 + i, merged_store, key)
    elif not (merging and policy.closes_pair(layer + 1)):  # a pair's earlier layer waits whole for the merge
        store.compress()


def settle_store(policy, layer: int, store, keep, value: torch.Tensor):
    """One quantized store (a layer, or one row of it) after ``policy`` chose ``keep`` among its slots (``value``:
    their values as attention read them); returns the store, a new one where heads part."""
    if isinstance(keep, list):  # AdaKV, HeadKV: a store per head
        return PerHeadQuantStore.from_store(store, keep)
    if keep is not None and policy.merges_values:  # CaM: merged values held whole
        merged = policy.merge_values(layer, keep, value)
        store.rewrite_values(merged, (merged != value).any(-1))
    if keep is not None:
        store.gather(keep)
    if policy.prunes_channels and store.channels is None and not store.key_codes.shape[2]:
        channels = policy.channel_keep(layer, store.view()[0])  # ThinK: after the token choice
        if channels is not None:
            store.prune_channels(channels)
    return store

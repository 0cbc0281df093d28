"""The store stage: after the kernel has read a step, the policy's choice applied to the layer's storage.

Every layer, and every row of a batch whose rows choose for themselves, goes through the same three calls: the
policy chooses (``settle``), does its own tensor work through the store's operations (``before_keep``,
``after_keep``; CaM merges values, ThinK prunes key channels), and the store applies the choice
(:meth:`LayerStore.keep`; a per-head choice parts the heads). What this module decides is only where the result
lives: a dense layer in transformers' own storage (its frame moved in place, or gathered with its keys placed at
their new slots by :class:`KeyPlacement`), a batch's rows aligned by filler slots, or a store of its own; and,
under a quantizer, when a step's tokens are quantized.
"""
from __future__ import annotations

import torch

from ..policies.base import CachePolicy, kept_runs
from ..storage import DenseStore, LayerStore, RowStores, gather_slots


def settle(cache, step) -> None:
    """Compact layer ``step.layer`` of ``cache`` for the next step."""
    layer = step.layer
    if cache._stores[layer] is not None:  # every layer under a quantizer
        settle_held(cache, step)
    elif step.rows is None:
        settle_dense(cache, step)
    else:
        settle_rows(cache, step)
    merged = merge_with_previous(cache, step)
    if cache.quant is not None and not merged and not cache.policy.holds_whole(layer):
        cache._stores[layer].compress()  # the residual's oldest tokens quantized


def compacted(policy, layer: int, store: LayerStore, keep, value: torch.Tensor) -> LayerStore:
    """``store`` (a layer, or one row of it) after ``policy``'s choice ``keep`` and its own tensor work (``value``:
    the values as this step's attention read them)."""
    policy.before_keep(layer, keep, store, value)
    return policy.after_keep(layer, store.keep(keep))


def settle_held(cache, step) -> None:
    """A layer held in a store of its own. In a batch of rows each row holds its own tokens in a store of its own
    (:class:`RowStores`), chosen, evicted and quantized as alone; a quantized batch is split into rows on its first
    pass, before anything is quantized."""
    layer, value, store = step.layer, step.value, cache._stores[step.layer]
    if step.rows is None:
        store = compacted(cache.policy, layer, store, cache.policy.settle(layer, step.n), value)
    else:
        fillers = step.fillers_before.tolist()
        if not isinstance(store, RowStores):
            store = RowStores([cache.quant.new_store(step.stored_key[j:j + 1, :, f:], value[j:j + 1, :, f:])
                               for j, f in enumerate(fillers)])
        keeps = cache.rows.settle(layer, step.n)
        store.stores = [compacted(row, layer, part, keep, value[j:j + 1, :, f:])
                        for j, (row, part, keep, f) in enumerate(zip(step.rows, store.stores, keeps, fillers))]
        cache.rows.fillers[layer] = store.shape()[2] - store.row_lengths()
    cache._keep_in_store(layer, store, step.stored_key)


def settle_dense(cache, step) -> None:
    """A dense layer under one policy: it stays dense unless the policy's choice or work gives it a store of its
    own (heads of different lengths, pruned key channels)."""
    policy, layer, key = cache.policy, step.layer, step.stored_key
    keep = policy.settle(layer, step.n)
    store = DenseStore(key, step.value)
    policy.before_keep(layer, keep, store, step.value)
    if isinstance(keep, list):
        store = store.keep(keep)
    elif keep is not None:
        store = DenseStore(*dense_keep(cache, step, keep, store.value))
    held = policy.after_keep(layer, store)
    if not isinstance(held, DenseStore):
        cache._keep_in_store(layer, held, key)
    elif held.key is not key or held.value is not step.value:
        cache._set_layer(layer, held.key, held.value)


def settle_rows(cache, step) -> None:
    """A dense layer of a batch whose rows choose for themselves, each among its own tokens: the rows stay one
    dense layer, aligned by filler slots at the front (:meth:`BatchRows.aligned`), unless a row's choice or its
    policy's work gives it a store of its own; then every row holds one (:class:`RowStores`)."""
    layer, n, key, value = step.layer, step.n, step.stored_key, step.value
    keeps = cache.rows.settle(layer, n)
    value = rewritten_values(step, keeps)
    if any(isinstance(keep, list) for keep in keeps):  # heads of different lengths
        stores = [row.after_keep(layer, part.keep(keep)) for row, part, keep in zip(step.rows, row_parts(
                  key, value, step.fillers_before), keeps)]
        return hold_rows(cache, step, stores)
    index = cache.rows.aligned(layer, keeps, n, key.shape[1])
    heads_alike = all(keep is None or keep.dim() == 1 for keep in keeps)
    kept_key, kept_value = (key, value) if index is None else dense_keep(cache, step, index, value, heads_alike)
    parts = row_parts(kept_key, kept_value, cache.rows.fillers[layer]) if works(step.rows, "after_keep") else []
    held = [row.after_keep(layer, part) for row, part in zip(step.rows, parts)]
    if any(h is not part for h, part in zip(held, parts)):
        hold_rows(cache, step, held)
    elif kept_key is not key or kept_value is not step.value:
        cache._set_layer(layer, kept_key, kept_value)


def works(policies: list, hook: str) -> bool:
    """Whether any of ``policies`` does tensor work of its own in ``hook``: rows whose policies do none need no
    per-row views of the batch's tensors (the result is the same either way; the views cost a step time)."""
    return any(getattr(type(p), hook) is not getattr(CachePolicy, hook) and p.works_in(hook) for p in policies)


def row_parts(key: torch.Tensor, value: torch.Tensor, fillers: torch.Tensor) -> list:
    """Each row's own slots (after its ``fillers``) of a batch's ``[b, kv_heads, n, d]`` key and value, as a
    :class:`DenseStore` of views."""
    return [DenseStore(key[j:j + 1, :, f:], value[j:j + 1, :, f:]) for j, f in enumerate(fillers.tolist())]


def rewritten_values(step, keeps: list) -> torch.Tensor:
    """The step's values (``[b, kv_heads, n, d]``) after each row's :meth:`before_keep`: the same tensor where no
    row's policy rewrote any, else a new one (the step's attention has read the old)."""
    if not works(step.rows, "before_keep"):
        return step.value
    parts = row_parts(step.stored_key, step.value, step.fillers_before)
    read = [part.value for part in parts]
    for row, part, keep in zip(step.rows, parts, keeps):
        row.before_keep(step.layer, keep, part, part.value)
    if all(part.value is was for part, was in zip(parts, read)):
        return step.value
    fillers = step.fillers_before.tolist()
    return torch.cat([torch.cat([step.value[j:j + 1, :, :f], part.value], 2) for j, (part, f) in
                      enumerate(zip(parts, fillers))])


def hold_rows(cache, step, stores: list) -> None:
    """Hold the layer as the rows' own ``stores``; a row kept whole as a view of the batch's tensors is copied, so
    that it holds only its own memory."""
    owned = [DenseStore(s.key.clone(), s.value.clone()) if isinstance(s, DenseStore) and
             (s.key._base is not None or s.value._base is not None) else s for s in stores]
    store = RowStores(owned)
    cache.rows.fillers[step.layer] = store.shape()[2] - store.row_lengths()
    cache._keep_in_store(step.layer, store, step.stored_key)


def dense_keep(cache, step, keep: torch.Tensor, value: torch.Tensor, heads_alike: bool = True):
    """A dense layer's kept ``(key, value)`` (``value``: the step's, or the policy's rewrite of them): the frame
    moved where only older slots go and nothing needs the step's tensors any more, else gathered, keys of a slot
    policy stored rotated rotated to the slots they now hold. In a batch of rows, ``keep`` is the rows' aligned
    ``[b, kv_heads, width]`` and ``heads_alike`` says whether every row chose the same slots for all its heads."""
    placement, key, rows = cache.placement, step.stored_key, step.rows
    # a sparse read scores pages by per-channel bounds, which a rotation of the frame would change; the frame moves
    # the layer's own memory, and rewritten values (CaM) are a new tensor, gathered with their keys
    movable = placement.can_move_frame() and value is step.value and cache.read is None and \
        not (key.requires_grad or value.requires_grad)  # in-place writes would break autograd
    if movable and rows is not None and heads_alike:
        return placement.compact_rows_in_place(step.layer, key, value, keep, cache.rows.fillers[step.layer])
    if movable and rows is None and keep.dim() == 1:
        runs = cache.policy.kept_runs(step.layer)  # read from the plan once per compaction where the policy has one
        oldest, newest = kept_runs(keep[None], step.n)[0].tolist() if runs is None else runs
        if newest:
            return placement.compact_in_place(step.layer, key, value, keep, newest, oldest)
    kept_key, kept_value = gather_slots(key, value, keep)  # the stored keys, rotated or not
    if placement.rotated and placement.slot:  # kept keys move to slots 0 .. n_keep - 1 (after a row's fillers)
        fillers = None if rows is None else cache.rows.fillers[step.layer]  # after this step's choice
        kept_key = placement.moved_keys(kept_key, keep, step.n, fillers)
    return kept_key, kept_value


def merge_with_previous(cache, step) -> bool:
    """Hold layers ``step.layer - 1`` and ``step.layer`` in the stores the policy merges them into, where it does
    (MiniCache, after the prompt's pass); whether it did."""
    layer = step.layer
    if layer == 0:
        return False
    fillers = None if step.rows is None else step.fillers_before
    pair = cache.policy.merged_stores(layer, lambda: cache._stored(layer - 1), (step.stored_key, step.value),
                                      fillers, cache.quant)
    if pair is None:
        return False
    for i, store in enumerate(pair):
        cache._keep_in_store(layer - 1 + i, store, step.stored_key)
    return True

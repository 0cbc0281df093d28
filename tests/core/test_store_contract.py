"""One contract for every :class:`lacache_core.storage.LayerStore`: each store, built by one factory entry from
small random ``[b, kv_heads, n, d]`` tensors, goes through the same checks (shape, append, bytes, eviction,
checkpoint, rotated keys). What a store cannot do by design is named in its entry with the reason, and the
test asserts that the store indeed refuses it, so a store that gains the ability is brought under the check.

Quantized stores are compared within their quantizer's bound: KIVI's codes are within half a step of the value
(``scale / 2``, :func:`lacache_core.quant.quantize`), and a step is at most the whole tensor's range over
``2**bits - 1``; GEAR's low-rank correction is the best rank-``r`` fit of a block's error (Eckart-Young), so
each block's error is at most the uncorrected one in Frobenius norm, hence so is the whole view's.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import pytest
import torch

import lacache_core
from lacache_core.errors import ConfigError
from lacache_core.gear import GEARStore
from lacache_core.kivi_reference import KIVIReferenceStore
from lacache_core.quant import KIVIStore, PerHeadQuantStore, QuantizedStore, store_from_state
from lacache_core.quantizers import GEAR, KIVI
from lacache_core.policies.minicache import merge_layers
from lacache_core.merged_store import MergedLayerStore
from lacache_core.storage import (DenseStore, LayerStore, PerHeadStore,
                                  PrunedChannelStore, RowStores)

B, HEADS, D = 2, 2, 32
# 4 bits: a step is a sixteenth of the range, tight enough that a wrong scale or offset is far outside the bound;
# post-RoPE keys so that write_newest_keys (rotated keys written in place) is allowed
KIVI_CONFIG = KIVI(bits=4, group=4, residual=4, key_order="post_rope")
# GEAR's factors (a rank-2 block factor per 8 tokens) and scales cost more than they save below head_dim 32, group 8
GEAR_CONFIG = GEAR(bits=4, group=8, residual=8, rank=2, key_order="post_rope")
REFERENCE_CONFIG = KIVI(bits=4, group=4, residual=4, key_order="post_rope", schedule="reference")
NO_STATE = "has no state(): checkpoints (the perplexity harness) hold quantized layers only"
# unquantized stores are built once, after the token choice; the cache refuses to compact them again (cache.py)
BUILT_ONCE = "built after the token choice: a layer held in a store of its own is never compacted again"
# a method's own tensor work (CaM's merged values, ThinK's pruned channels, a per-head choice) is done on a layer
# as the kernel reads it, dense or quantized, before it is held in any other form
NO_METHOD_WORK = {"per_head": BUILT_ONCE, "rewrite_values": BUILT_ONCE, "prune_channels": BUILT_ONCE}
ROW_WORK = {name: "the cache applies it to each row's own store" for name in NO_METHOD_WORK}


@dataclass
class Case:
    """One store in the contract.

    build : ``(key, value) -> store``, from ``[b, kv_heads, n, d]`` tensors.
    bits : the quantizer's bits (``None``: the store holds what it is given, compared exactly).
    frobenius : compare in Frobenius norm (GEAR's low-rank correction), else entry by entry.
    cannot : operation (``gather``: :meth:`LayerStore.keep` of some slots, ``state``,
        ``write_newest_keys_before_append``, ``per_head``: ``keep`` of a list of per-head slots, ``rewrite_values``,
        ``prune_channels``) -> why the store refuses it by design; the test asserts the refusal.
    from_state : rebuilds the store from its ``state()``.
    """

    name: str
    cls: type
    build: Callable[[torch.Tensor, torch.Tensor], LayerStore]
    bits: Optional[int] = None
    frobenius: bool = False
    cannot: Dict[str, str] = field(default_factory=dict)
    from_state: Optional[Callable[[dict], LayerStore]] = None


def _per_head(key, value):
    heads = key.shape[1]
    return PerHeadStore(key, value, [torch.arange(key.shape[2] - h) for h in range(heads)])


def _pruned(key, value):
    channels = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]])[:key.shape[1]]
    return PrunedChannelStore(key, value, channels, 2)


def _pruned_score_rows(key, value):
    n = key.shape[2]
    whole = torch.stack([torch.tensor([0, n - 1]), torch.tensor([1, 2])])[:key.shape[1]]
    return PrunedChannelStore(key, value, torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]]), whole)


def _merged(quant: Optional[KIVI]):
    """Layer 1 of a MiniCache pair (merged by the library's own merge) whose layer 0 is ``key``, ``value`` reversed
    along the channels; under ``quant`` the directions and the tail are quantized, as the cache holds them."""
    def build(key, value):
        pair = merge_layers((key.flip(-1), value.flip(-1)), (key, value), 0.5, 0.25, quant)
        return MergedLayerStore(pair, 1)

    return build


def _per_head_quant(key, value):
    heads = key.shape[1]
    return PerHeadQuantStore.from_store(KIVIStore(KIVI_CONFIG, key, value),
                                        [torch.arange(key.shape[2] - 2 * h) for h in range(heads)])


def _rows(key, value):
    """Two rows of KIVI stores, the second holding two tokens fewer (a shorter prompt)."""
    return RowStores([KIVIStore(KIVI_CONFIG, key[:1], value[:1]),
                      KIVIStore(KIVI_CONFIG, key[1:2, :, 2:], value[1:2, :, 2:])])


CASES = [
    Case("dense", DenseStore, DenseStore, cannot={"state": NO_STATE}),
    Case("per_head", PerHeadStore, _per_head,
         cannot={"gather": BUILT_ONCE, "state": NO_STATE, **NO_METHOD_WORK}),
    Case("pruned_channels", PrunedChannelStore, _pruned,
         cannot={"gather": BUILT_ONCE, "state": NO_STATE, **NO_METHOD_WORK}),
    Case("pruned_channels_score_rows", PrunedChannelStore, _pruned_score_rows,
         cannot={"gather": BUILT_ONCE, "state": NO_STATE, **NO_METHOD_WORK}),
    Case("merged", MergedLayerStore, _merged(None),
         cannot={"gather": "MiniCache merges once, after the prompt", "state": NO_STATE, **NO_METHOD_WORK,
                 "write_newest_keys_before_append": "the merged slots are shared by two layers: only the layer's own "
                                                    "newer tokens can be rewritten"}),
    Case("merged_quant", MergedLayerStore, _merged(KIVI_CONFIG), bits=4,
         cannot={"gather": "MiniCache merges once, after the prompt", "state": NO_STATE, **NO_METHOD_WORK,
                 "write_newest_keys_before_append": "the merged slots are shared by two layers: only the layer's own "
                                                    "newer tokens can be rewritten"}),
    Case("kivi", KIVIStore, lambda k, v: KIVIStore(KIVI_CONFIG, k, v), bits=4,
         from_state=lambda s: KIVI_CONFIG.store_from_state(s)),
    Case("gear", GEARStore, lambda k, v: GEARStore(GEAR_CONFIG, k, v), bits=4, frobenius=True,
         from_state=lambda s: GEAR_CONFIG.store_from_state(s)),
    Case("kivi_reference", KIVIReferenceStore, lambda k, v: KIVIReferenceStore(REFERENCE_CONFIG, k, v), bits=4,
         cannot={"gather": "keys and values are quantized at different times: no method may evict from it",
                 **{name: "the reference schedule runs the full cache only" for name in NO_METHOD_WORK}},
         from_state=lambda s: REFERENCE_CONFIG.store_from_state(s)),
    Case("per_head_quant", PerHeadQuantStore, _per_head_quant, bits=4,
         cannot={"gather": "a layer held per head cannot be compacted again", **NO_METHOD_WORK,
                 "state": "checkpoints of per-head quantized layers are not built (the harness refuses them)"}),
    Case("rows", RowStores, _rows, bits=4, cannot={"gather": "the cache evicts from each row's own store", **ROW_WORK},
         from_state=lambda s: store_from_state(KIVI_CONFIG, s)),
]


def _tensors(n: int, seed: int):
    """Random ``(key, value)``, each ``[B, HEADS, n, D]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, HEADS, n, D, generator=g), torch.randn(B, HEADS, n, D, generator=g)


def _settle(case: Case, store: LayerStore) -> None:
    """End of a step: a quantized store quantizes what its schedule says (the cache calls it under a quantizer only)."""
    if case.bits is not None:
        store.compress()


def _close(case: Case, got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` is ``want`` exactly, or within the quantizer's bound (see the module docstring)."""
    assert got.shape == want.shape
    if case.bits is None:
        assert torch.equal(got, want)
        return
    half_step = float(want.max() - want.min()) / (2 ** case.bits - 1) / 2 + 1e-5
    if case.frobenius:
        # the entries that differ are quantized ones (whole ones are exact), at most half a step each in RMS
        assert float((got - want).norm()) <= half_step * math.sqrt(int((got != want).sum()))
    else:
        assert float((got - want).abs().max()) <= half_step


def _dense_bytes(store: LayerStore) -> int:
    return sum(t.numel() * t.element_size() for t in store.view())


def _refuses(case: Case, operation: str, attempt: Callable[[], object]) -> None:
    """The store refuses ``operation`` as its entry says (no such method, or an error when called)."""
    assert case.cannot[operation]
    with pytest.raises((AttributeError, RuntimeError, ConfigError, NotImplementedError)):
        attempt()


def _built(case: Case, n: int = 10, seed: int = 0) -> LayerStore:
    store = case.build(*_tensors(n, seed))
    _settle(case, store)
    return store


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request) -> Case:
    return request.param


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_layer_store_has_a_factory_entry():
    # every module of the library imported, so that a store in a module this file does not import is found too
    for module in pkgutil.walk_packages(lacache_core.__path__, lacache_core.__name__ + "."):
        importlib.import_module(module.name)
    found = {sub for sub in _all_subclasses(LayerStore) if sub.__module__.startswith(lacache_core.__name__ + ".")}
    assert found - {QuantizedStore} == {c.cls for c in CASES}  # QuantizedStore: a shared base, never built itself


def test_shape_agrees_with_view(case):
    store = _built(case)
    key, value = store.view()
    assert tuple(key.shape[:3]) == tuple(value.shape[:3]) == tuple(store.shape())
    assert key.shape[3] == value.shape[3] == D


@pytest.mark.parametrize("k", [1, 9])  # 9: past every residual, so some new tokens are quantized at the step's end
def test_append_grows_by_k_and_holds_the_new_tokens(case, k):
    store = _built(case)
    before_key, before_value = (t.clone() for t in store.view())
    n = store.shape()[2]
    key, value = _tensors(k, seed=7)
    store.append(key, value)
    assert store.shape()[2] == n + k
    got_key, got_value = store.view()
    # before the step ends the new tokens are whole in every store (a quantized one's residual)
    assert torch.equal(got_key[:, :, n:], key) and torch.equal(got_value[:, :, n:], value)
    _close(case, got_key[:, :, :n], before_key)
    _close(case, got_value[:, :, :n], before_value)
    full_key, full_value = (t.clone() for t in store.view())
    _settle(case, store)
    assert store.shape()[2] == n + k
    got_key, got_value = store.view()
    _close(case, got_key, full_key)
    _close(case, got_value, full_value)
    _close(case, got_key[:, :, n:], key)  # the new tokens as quantized, against the tokens themselves
    _close(case, got_value[:, :, n:], value)


def test_nbytes_positive_grows_and_at_most_dense(case):
    store = _built(case)
    sizes = [store.nbytes()]
    for step in range(3):
        store.append(*_tensors(3, seed=10 + step))
        _settle(case, store)
        sizes.append(store.nbytes())
        assert sizes[-1] <= _dense_bytes(store)
    assert sizes[0] > 0 and all(a < b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize("form", ["slots", "per_head", "per_row_and_head"])
def test_gather_keeps_exactly_those_slots(case, form):
    store = _built(case, n=14)
    n = store.shape()[2]
    if "gather" in case.cannot:
        _refuses(case, "gather", lambda: store.keep(torch.arange(n - 1)))
        assert store.keep(None) is store  # keeping every slot is no compaction: every store allows it
        return
    keep = {"slots": torch.tensor([0, 3, 4, 9, 12, 13]),
            "per_head": torch.tensor([[0, 1, 2, 11, 12, 13], [5, 6, 7, 8, 9, 13]]),
            "per_row_and_head": torch.tensor([[[0, 3, 4, 9, 12, 13], [1, 2, 10, 11, 12, 13]],
                                              [[6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 13]]])}[form]
    full = keep.expand(B, HEADS, keep.shape[-1])
    want = [t.gather(2, full[..., None].expand(*full.shape, D)) for t in store.view()]
    held_quantized = store.key_codes.shape[2] if case.bits is not None else 0
    store = store.keep(keep)
    assert store.shape()[2] == keep.shape[-1]
    for got, expected in zip(store.view(), want):
        _close(case, got, expected)
    if case.bits is not None:  # a kept quantized token keeps its codes: the slots quantized before stay exact
        quantized = int((full < held_quantized).sum(-1).min())
        for got, expected in zip(store.view(), want):
            assert torch.equal(got[:, :, :quantized], expected[:, :, :quantized])


def test_state_round_trips(case):
    store = _built(case)
    store.append(*_tensors(2, seed=3))  # a residual part-way, so the round trip holds both forms
    if "state" in case.cannot:
        _refuses(case, "state", lambda: store.state())
        return
    state = {name: t.clone() for name, t in store.state().items()}
    again = case.from_state(state)
    assert again.nbytes() == store.nbytes()
    assert again.shape() == store.shape()
    for got, want in zip(again.view(), store.view()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("k", [1, 3])
def test_write_newest_keys_changes_only_the_newest(case, k):
    store = _built(case)
    if "write_newest_keys_before_append" in case.cannot:
        _refuses(case, "write_newest_keys_before_append", lambda: store.write_newest_keys(_tensors(k, 9)[0]))
    store.append(*_tensors(k, seed=4))
    before_key, before_value = (t.clone() for t in store.view())
    rotated = _tensors(k, seed=5)[0]
    store.write_newest_keys(rotated)
    key, value = store.view()
    n = store.shape()[2]
    assert torch.equal(key[:, :, n - k:], rotated)
    assert torch.equal(key[:, :, :n - k], before_key[:, :, :n - k])
    assert torch.equal(value, before_value)


def test_per_head_keep_parts_the_heads(case):
    """A list of per-head slots gives a store whose view holds each head's own slots, left-padded with zeros to the
    longest, with those lengths; chosen on a layer whose tokens are all still whole (the prompt's pass)."""
    store = case.build(*_tensors(10, seed=0))
    keep = [torch.tensor([0, 4, 9]), torch.tensor([1, 2, 3, 8, 9])]
    if "per_head" in case.cannot:
        _refuses(case, "per_head", lambda: store.keep(keep))
        return
    key, value = (t.clone() for t in store.view())
    parted = store.keep(keep)
    assert parted.shape() == (B, HEADS, 5)
    assert parted.head_lengths().tolist() == [3, 5]
    for got, full in zip(parted.view(), (key, value)):
        for h, slots in enumerate(keep):
            want = full[:, h].index_select(1, slots)
            assert torch.equal(got[:, h, 5 - len(slots):], want)  # whole until the step ends, quantized or not
            assert not got[:, h, :5 - len(slots)].any()


def test_rewrite_values_changes_only_the_slots_named(case):
    store = _built(case)
    n = store.shape()[2]
    new_values = _tensors(n, seed=11)[1]
    changed = torch.zeros(B, HEADS, n, dtype=torch.bool)
    changed[0, 1, [0, 5, n - 1]] = True  # a quantized slot and a residual one, where the store has both
    changed[1, 0, 2] = True
    if "rewrite_values" in case.cannot:
        _refuses(case, "rewrite_values", lambda: store.rewrite_values(new_values, changed))
        return
    key, value = (t.clone() for t in store.view())
    store.rewrite_values(new_values, changed)
    got_key, got_value = store.view()
    assert torch.equal(got_key, key)
    assert torch.equal(got_value[changed], new_values[changed])  # a rewritten value is held whole, never requantized
    assert torch.equal(got_value[~changed], value[~changed])


def test_prune_channels_zeroes_the_dropped_channels_of_older_keys(case):
    """Pruned key channels read as zeros in the keys that lost them (the older ones; a quantized store's quantized
    keys, including those quantized later), the kept channels and the whole keys as they were."""
    store = case.build(*_tensors(10, seed=0))  # nothing quantized yet: channels are chosen first
    channels = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]])
    if "prune_channels" in case.cannot:
        assert not store.prunable
        _refuses(case, "prune_channels", lambda: store.prune_channels(channels, 2))
        return
    assert store.prunable
    key = store.view()[0].clone()
    store = store.prune_channels(channels, 2)
    assert not store.prunable  # once per layer: no key is pruned or quantized at two widths
    _settle(case, store)
    lost = store.key_codes.shape[2] if case.bits is not None else key.shape[2] - 2
    got = store.view()[0]
    dropped = torch.ones(HEADS, D, dtype=torch.bool).scatter_(1, channels, False)  # [kv_heads, d]
    older, kept = got[:, :, :lost], dropped[None, :, None, :].expand(B, HEADS, lost, D)
    assert lost > 0 and not older[kept].any()
    _close(case, older.masked_fill(kept, 0), key[:, :, :lost].masked_fill(kept, 0))
    assert torch.equal(got[:, :, lost:], key[:, :, lost:])

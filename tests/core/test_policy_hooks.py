"""A method's own tensor work goes through its hooks and the store's operations, with no edit to the cache: methods
defined here, at run time, that rewrite values before the choice applies (as CaM does) or hold their layers in
another store after it (as ThinK does), against the same policy without the hook."""
from dataclasses import dataclass

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import CompressedCache, StreamingLLM, enable_position_shift
from lacache_core.storage import PrunedChannelStore
from lacache_core.versions import with_cache
from tiny import tiny_model

needs_cache = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                 reason="Cache objects need transformers >= 4.36")
needs_padding = pytest.mark.skipif(Version(transformers.__version__) < Version("4.48"),
                                   reason="padded batches need the attention-interface path (transformers >= 4.48)")
LAYERS = 6
TOKENS = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(5))


@dataclass
class HalvedOnEviction(StreamingLLM):
    """StreamingLLM, but every value is halved whenever the layer evicts."""

    def before_keep(self, layer, keep, store, value):
        if keep is not None:
            store.rewrite_values(value / 2, torch.ones(value.shape[:3], dtype=torch.bool))


HALF_OF = {"start_size": 4, "recent_size": 36}
DROPPED = torch.arange(8, 16)  # of head_dim 16


@dataclass
class PrunedAfterKeep(StreamingLLM):
    """StreamingLLM whose layers, after the first eviction, keep channels 0-7 of all keys but the newest 4."""

    def after_keep(self, layer, store):
        if not store.prunable or self.seen < 40:
            return store
        kv_heads = store.view()[0].shape[1]
        return store.prune_channels(torch.arange(8).expand(kv_heads, 8), 4)


def run(model, cache, ids, mask=None):
    with torch.no_grad():
        model(ids, attention_mask=mask, **with_cache(cache), use_cache=True)
    return cache


@needs_cache
def test_values_rewritten_before_the_choice_are_what_the_cache_keeps():
    model = enable_position_shift(tiny_model("llama", "eager"))
    halved = run(model, CompressedCache(HalvedOnEviction(**HALF_OF), LAYERS), TOKENS[:1, :60])
    plain = run(model, CompressedCache(StreamingLLM(**HALF_OF), LAYERS), TOKENS[:1, :60])
    assert torch.equal(halved.kept_positions(), plain.kept_positions())
    for i in range(LAYERS):
        (key, value), (plain_key, plain_value) = halved._layer(i), plain._layer(i)
        assert torch.equal(value, plain_value / 2)
        # plain StreamingLLM moves its layer's frame in place; rewritten values are gathered with their keys,
        # which are rotated to their new slots: the same keys up to rounding
        torch.testing.assert_close(key, plain_key, rtol=1e-5, atol=1e-5)


@needs_padding
def test_each_row_of_a_padded_batch_rewrites_its_own_values():
    """Left padding gives each row a policy of its own: the hook then runs per row, over the row's own slots."""
    model = enable_position_shift(tiny_model("llama", "eager"))
    ids = TOKENS[:, :60].clone()
    ids[1, :10] = 0
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    batch = run(model, CompressedCache(HalvedOnEviction(**HALF_OF), LAYERS), ids, mask)
    alone = [run(model, CompressedCache(HalvedOnEviction(**HALF_OF), LAYERS), ids[j:j + 1, 10 * j:])
             for j in range(2)]
    for i in range(LAYERS):
        key, value = batch._layer(i)
        for j, cache in enumerate(alone):
            own_key, own_value = cache._layer(i)
            n = own_value.shape[2]
            torch.testing.assert_close(value[j:j + 1, :, -n:], own_value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(key[j:j + 1, :, -n:], own_key, rtol=1e-5, atol=1e-5)


@needs_cache
def test_a_store_returned_after_the_choice_holds_the_layer():
    model = enable_position_shift(tiny_model("llama", "eager"))
    pruned = CompressedCache(PrunedAfterKeep(**HALF_OF, key_positions="original"), LAYERS)
    plain = CompressedCache(StreamingLLM(**HALF_OF, key_positions="original"), LAYERS)
    for cache in (pruned, plain):
        run(model, cache, TOKENS[:1, :60])
    for i in range(LAYERS):
        assert isinstance(pruned._stores[i], PrunedChannelStore)
        (key, value), (plain_key, plain_value) = pruned._layer(i), plain._layer(i)
        assert torch.equal(value, plain_value) and torch.equal(key[:, :, -4:], plain_key[:, :, -4:])
        older, plain_older = key[:, :, :-4], plain_key[:, :, :-4]
        assert not older[..., DROPPED].any() and plain_older[..., DROPPED].abs().min() > 0
        assert torch.equal(older[..., :8], plain_older[..., :8])
    assert pruned.kv_bytes() < plain.kv_bytes()
    # a store of pruned channels is built once, after a prompt: a policy that evicts again is told so in one line
    with pytest.raises(RuntimeError, match="PrunedChannelStore: a layer held in a store of its own cannot be compacted"):
        run(model, pruned, TOKENS[:1, 60:61])

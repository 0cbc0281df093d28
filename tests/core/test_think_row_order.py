"""ThinK's ``row_order="score"``: the keys left whole are the last ``unpruned_window`` of KVCache-Factory's cache rows
(Zefan-Cai/KVCache-Factory @ c97f9d7, ``pyramidkv/pyramidkv_utils.py``: ``SnapKVCluster.update_think`` gathers
SnapKV's ``topk`` indices unsorted, appends the window, and ``key_pruner_query_driven`` strips channels from all
rows but the last ``recent_size``), against a re-derivation of that code written out here."""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version

from lacache_core import CompressedCache, ConfigError, ThinK, build_policy, enable_position_shift
from lacache_core.policies.think import score_ordered
from lacache_core import KIVI
from lacache_core.storage import PrunedChannelStore
from lacache_core.versions import with_cache
from tiny import tiny_model

GEN = torch.Generator().manual_seed(11)


def test_score_order_by_hand():
    # kept positions 1, 3, 4 of the prefix (positions 0-7) and the window 8, 9; scores 0.1, 0.9, 0.5 at 1, 3, 4.
    # The reference's rows: 3, 4, 1 (by descending score), then 8, 9 -- slots 1, 2, 0, 3, 4
    kept = torch.tensor([[1, 3, 4, 8, 9]])
    scores = torch.zeros(1, 8)
    scores[0, 1], scores[0, 3], scores[0, 4] = 0.1, 0.9, 0.5
    assert score_ordered(kept, scores, 0, 8).tolist() == [[1, 2, 0, 3, 4]]
    # so its last 3 rows, left whole, are positions 1 (the lowest score), 8 and 9; the newest 3 are 4, 8, 9
    # with a sink (start_size 2: position 1): the sink leads, so 4, 8, 9 end the order
    assert score_ordered(kept, scores, 2, 8).tolist() == [[0, 1, 2, 3, 4]]


def reference_rows(query, key, cache_size, window, kernel, recent, ratio):
    """``update_think`` then ``key_pruner_query_driven`` (MHA: one query head per KV head), per head a dict
    position -> the key row its cache holds: the ``topk`` rows in their gathered order, then the window; all but the
    last ``recent`` rows lose the ``int(d * ratio)`` channels of lowest ``mean(q[-32:]^2) * mean(k_kept^2)``."""
    d = key.shape[-1]
    logits = query[:, :, -window:] @ key.transpose(2, 3) / math.sqrt(d)
    logits[:, :, :, -window:] += torch.full((window, window), float("-inf")).triu(1)
    scores = logits.softmax(-1, dtype=torch.float32)[..., :-window].sum(-2)
    pooled = F.max_pool1d(scores, kernel, stride=1, padding=kernel // 2)
    top = pooled.topk(cache_size - window, dim=-1).indices  # best first: the order of the cache's rows
    n = key.shape[2]
    positions = torch.cat([top, torch.arange(n - window, n).expand(*top.shape[:2], window)], -1)  # [1, heads, C]
    rows = key.gather(2, positions[..., None].expand(-1, -1, -1, d))
    energy = query[..., -32:, :].pow(2).mean(2) * rows.pow(2).mean(2)  # [1, heads, d]
    dropped = energy.topk(int(d * ratio), dim=-1, largest=False).indices
    stripped = rows.clone()
    older = stripped[:, :, :cache_size - recent]
    older.scatter_(-1, dropped[:, :, None, :].expand(*older.shape[:3], -1), 0.0)
    return [dict(zip(positions[0, h].tolist(), map(tuple, stripped[0, h].tolist()))) for h in range(key.shape[1])]


def our_rows(query, key, cache_size, window, kernel, recent, ratio, row_order="score"):
    """Our ThinK on one layer, through :class:`PrunedChannelStore`: per head a dict position -> the key row the
    attention reads."""
    policy = ThinK(cache_size=cache_size, window_size=window, kernel_size=kernel, pruning_ratio=ratio,
                   unpruned_window=recent, row_order=row_order)
    policy.observe(0, query, key, scaling=key.shape[-1] ** -0.5)
    keep = policy.compact(key.shape[2], 1)
    n, d = key.shape[2], key.shape[-1]
    keep = torch.arange(n).expand(key.shape[1], n) if keep is None else keep[0]
    kept_key = key.gather(2, keep[None, :, :, None].expand(1, -1, -1, d))
    store = PrunedChannelStore(kept_key, kept_key.clone(), policy.channel_keep(0, kept_key), policy.unpruned(0))
    view = store.view()[0]
    return [dict(zip(keep[h].tolist(), map(tuple, view[0, h].tolist()))) for h in range(key.shape[1])]


@pytest.mark.parametrize("n,recent", [(50, 10), (50, 14), (37, 9), (20, 10)])  # 20: the prompt is the budget
def test_whole_rows_match_the_re_derived_reference(n, recent):
    query, key = torch.randn(1, 4, n, 8, generator=GEN), torch.randn(1, 4, n, 8, generator=GEN)
    expected = reference_rows(query, key, 20, 6, 5, recent, 0.4)
    assert our_rows(query, key, 20, 6, 5, recent, 0.4) == expected
    # the default leaves the newest whole instead: with more rows whole than the window it differs
    assert our_rows(query, key, 20, 6, 5, recent, 0.4, row_order="position") != expected


def test_the_orders_agree_while_the_window_covers_the_unpruned_rows():
    query, key = torch.randn(1, 2, 50, 8, generator=GEN), torch.randn(1, 2, 50, 8, generator=GEN)
    assert our_rows(query, key, 20, 6, 5, 6, 0.4) == our_rows(query, key, 20, 6, 5, 6, 0.4, row_order="position")
    assert our_rows(query, key, 20, 6, 5, 4, 0.4) == reference_rows(query, key, 20, 6, 5, 4, 0.4)


def whole_positions(cache, layer):
    """Per head the positions whose keys are whole in the view of ``layer`` (nonzero in a dropped channel)."""
    store, positions = cache._stores[layer], cache.kept_positions()[layer]
    key = store.view()[0]
    dropped = torch.ones(key.shape[1], key.shape[-1], dtype=torch.bool).scatter_(-1, store.channels, False)
    whole = (key[0] * dropped[:, None, :]).abs().sum(-1) > 0  # [kv_heads, n]
    return [set(positions[h][whole[h]].tolist()) for h in range(key.shape[1])]


@pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                    reason="cache objects need transformers >= 4.36")
def test_the_cache_strips_the_score_ordered_rows_and_counts_their_index():
    model = enable_position_shift(tiny_model("llama", "eager"))
    tokens = torch.randint(0, 128, (1, 80), generator=GEN)
    settings = dict(cache_size=24, window_size=4, start_size=0, pruning_ratio=0.5, unpruned_window=10)
    by_position = CompressedCache(build_policy("think", **settings), 6)
    by_score = CompressedCache(build_policy("think", **settings, row_order="score"), 6)
    with torch.no_grad():
        for cache in (by_position, by_score):
            model(tokens, use_cache=True, **with_cache(cache))
    differ = False
    for layer in range(6):
        newest = whole_positions(by_position, layer)
        scored = whole_positions(by_score, layer)
        assert all(len(h) == 10 for h in scored) and all(set(range(76, 80)) <= h for h in scored)  # window whole
        assert all(h == set(by_position.kept_positions()[layer][g][-10:].tolist()) for g, h in enumerate(newest))
        differ |= scored != newest
    assert differ
    kv_heads, index = model.config.num_key_value_heads, 8
    assert by_score.kv_bytes() - by_position.kv_bytes() == 6 * kv_heads * 24 * index  # which rows lost channels


@pytest.mark.skipif(Version(transformers.__version__) < Version("4.48"),
                    reason="padded batches need transformers >= 4.48")
def test_a_padded_batch_row_keeps_what_it_keeps_alone():
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    rows = [torch.randint(0, 128, (n,), generator=GEN) for n in (60, 47)]
    ids, mask = torch.zeros(2, 60, dtype=torch.long), torch.zeros(2, 60, dtype=torch.long)
    for j, row in enumerate(rows):
        ids[j, 60 - len(row):], mask[j, 60 - len(row):] = row, 1
    settings = dict(cache_size=24, window_size=4, pruning_ratio=0.5, unpruned_window=10, row_order="score")

    def run(cache, prompt, attention_mask=None):
        return model.generate(prompt, attention_mask=attention_mask, **with_cache(cache), max_new_tokens=6,
                              min_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)

    batch = run(CompressedCache.for_rows([build_policy("think", **settings) for _ in rows], 6), ids, mask)
    for j, row in enumerate(rows):
        alone = run(CompressedCache(build_policy("think", **settings), 6), row[None])
        torch.testing.assert_close(torch.stack([s[j] for s in batch.logits]), torch.stack([s[0] for s in alone.logits]),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                    reason="CompressedCache needs transformers >= 4.36")
def test_score_order_is_refused_under_quant_and_bad_values_are_one_line_errors():
    policy = build_policy("think", cache_size=24, window_size=4, row_order="score")
    with pytest.raises(ConfigError, match="ThinK.row_order score cannot be used with make_cache.quant"):
        CompressedCache(policy, 2, quant=KIVI(key_order="post_rope"))
    with pytest.raises(ConfigError, match="ThinK.row_order"):
        build_policy("think", cache_size=24, window_size=4, row_order="newest")

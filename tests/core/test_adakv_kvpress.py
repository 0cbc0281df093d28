"""AdaKV's ``allocation="kvpress"`` against kvpress's ``AdaKVPress`` rule.

Reference: NVIDIA/kvpress @ 8bb29b9, ``kvpress/presses/adakv_press.py`` (``AdaKVPress.compress``) around
``kvpress/presses/snapkv_press.py`` (``SnapKVPress.score``). :func:`kvpress_snapkv_scores` and
:func:`kvpress_adakv_kept` re-derive, in plain tensor operations, what that code keeps per KV head.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from lacache_core import AdaKV
from lacache_core.policies.adakv import safeguarded_counts

WINDOW, KERNEL = 6, 5


def kvpress_snapkv_scores(query, key, window, kernel):
    """``SnapKVPress.score``: ``[1, kv_heads, n]``.

    The last ``window`` queries' mean attention to the prefix, average-pooled per query head, averaged over
    each KV head's query heads, and the window padded with the largest score plus one.
    """
    heads, kv_heads, n, d = query.shape[1], key.shape[1], key.shape[2], query.shape[-1]
    groups = heads // kv_heads
    logits = query[:, :, -window:] @ key.repeat_interleave(groups, 1).transpose(2, 3) / math.sqrt(d)
    logits = logits + torch.full_like(logits, float("-inf")).triu(n - window + 1)
    probs = logits.softmax(-1, dtype=torch.float32)[..., :-window]
    scores = F.avg_pool1d(probs.mean(-2), kernel, padding=kernel // 2, stride=1)
    scores = scores.view(1, kv_heads, groups, n - window).mean(2)
    return F.pad(scores, (0, window), value=scores.max().item() + 1)


def kvpress_adakv_kept(scores, compression_ratio, alpha_safeguard):
    """``AdaKVPress.compress``: per KV head, the positions left out of ``masked_key_indices`` (sorted)."""
    scores = scores.clone()
    _, kv_heads, k_len = scores.shape
    n_kept = int(k_len * (1 - compression_ratio))
    n_safe = int(n_kept * alpha_safeguard)
    scores.scatter_(-1, scores.topk(n_safe, dim=-1).indices, torch.finfo(scores.dtype).max)
    n_pruned = kv_heads * (k_len - n_kept)
    pruned = (-scores.reshape(1, -1)).topk(n_pruned, dim=1).indices.flatten()
    kept = torch.ones(kv_heads, k_len, dtype=torch.bool)
    kept[pruned // k_len, pruned % k_len] = False
    return [row.nonzero().flatten().tolist() for row in kept]


def inputs(n=80, heads=8, kv_heads=4, d=8, seed=3):
    """Random ``query [1, heads, n, d]`` and ``key [1, kv_heads, n, d]``, KV head 0 starved: its window keys
    lean towards its own window queries, so it spends its attention there and its prefix scores lose the
    flattened top-k to the other heads' (only a floor then gives it prefix tokens)."""
    gen = torch.Generator().manual_seed(seed)
    query, key = torch.randn(1, heads, n, d, generator=gen), torch.randn(1, kv_heads, n, d, generator=gen)
    key[0, 0, -WINDOW:] += 6 * query[0, :heads // kv_heads, -WINDOW:].mean((0, 1))
    return query, key


def ours(query, key, **settings):
    policy = AdaKV(window_size=WINDOW, kernel_size=KERNEL, pooling="avg", **settings)
    policy.observe(0, query, key, scaling=query.shape[-1] ** -0.5)
    return [row.tolist() for row in policy.compact(key.shape[2], 1)[0]]


def test_safeguarded_counts_by_hand():
    # 2 heads, 2 prefix slots each on average (4 in all); head 0 outscores head 1 everywhere.
    # floor 0: the flattened top 4 are all head 0's; floor 1: head 1's best is guaranteed, head 0 wins the
    # 2 left (4 and 3 beat 0.9); floor 2: 2 and 2.
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 0.9, 0.8, 0.7]])
    assert [safeguarded_counts(scores, 2, f).tolist() for f in (0, 1, 2)] == [[4, 0], [3, 1], [2, 2]]


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_kvpress_allocation_matches_adakvpress(alpha):
    # 80 tokens at compression ratio 0.75: kvpress keeps n_kept = 20 per head on average, our cache_size 20.
    # n_safe = int(20 alpha) = 0, 4, 10, 20: below the window (6) the safeguard only re-protects the window;
    # 10 guarantees each head 4 prefix tokens; 20 gives every head SnapKV's 14. The starved head 0 wins no
    # prefix token on its own, so it holds exactly the window or the safeguard.
    query, key = inputs()
    expected = kvpress_adakv_kept(kvpress_snapkv_scores(query, key, WINDOW, KERNEL), 0.75, alpha)
    kept = ours(query, key, cache_size=20, floor_ratio=alpha, allocation="kvpress")
    assert kept == expected
    assert sum(map(len, kept)) == 4 * 20
    assert len(kept[0]) == max(WINDOW, int(20 * alpha))
    assert (len({len(row) for row in kept}) > 1) == (alpha < 1)  # heads of different lengths, but for alpha 1


def test_kvpress_allocation_counts_sinks_among_the_safeguarded():
    # kvpress has no sinks; ours are protected like its window (scored above every prefix token), so
    # with 2 sinks the safeguard int(20 * 0.5) = 10 leaves 10 - 2 - 6 = 2 prefix tokens guaranteed per head.
    query, key = inputs()
    scores = kvpress_snapkv_scores(query, key, WINDOW, KERNEL)
    scores[..., :2] = scores[..., -1:]
    expected = kvpress_adakv_kept(scores, 0.75, 0.5)
    assert ours(query, key, cache_size=20, start_size=2, floor_ratio=0.5, allocation="kvpress") == expected


def test_kvpress_allocation_differs_from_the_default_rule():
    query, key = inputs()
    kvpress = ours(query, key, cache_size=20, allocation="kvpress")
    for normalize in (True, False):
        default = ours(query, key, cache_size=20, normalize=normalize)
        assert default != kvpress
        assert [len(row) for row in default] != [len(row) for row in kvpress]


def test_allocation_is_checked_and_old_hashes_are_kept():
    from harness.flags import resolved_hyperparameters
    from lacache_core import ConfigError

    with pytest.raises(ConfigError, match="AdaKV.allocation"):
        AdaKV(allocation="kv_press")
    args = argparse.Namespace()
    assert "allocation" not in resolved_hyperparameters(args, "adakv")  # the default: results keep their hash
    args.allocation = "kvpress"
    assert resolved_hyperparameters(args, "adakv")["allocation"] == "kvpress"


def test_kvpress_allocation_stores_heads_at_their_lengths():
    from lacache_core import CompressedCache, enable_position_shift
    from lacache_core.versions import HAS_CACHE_CLASSES, with_cache
    from tiny import tiny_model

    if not HAS_CACHE_CLASSES:
        pytest.skip("cache objects need transformers >= 4.36")
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    policy = AdaKV(cache_size=24, window_size=4, floor_ratio=0.5, allocation="kvpress")
    cache = CompressedCache(policy, model.config.num_hidden_layers)
    tokens = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(tokens, **with_cache(cache), use_cache=True)
    for layer in range(cache.num_layers):
        lengths = cache.head_lengths(layer)
        assert int(lengths.sum()) == 24 * len(lengths) and int(lengths.min()) >= 12  # int(24 * 0.5) safeguarded

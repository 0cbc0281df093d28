"""Selections of SnapKV, KNorm, Scissorhands and NACL against their reference code's rule.

Each ``reference_*`` function re-derives, in plain tensor operations, what KVCache-Factory's code
(``pyramidkv/pyramidkv_utils.py``, ``pyramidkv/scissorhands.py``, ``pyramidkv/nacl.py``) computes:
the full-size attention, the causal mask of the window block, float32 softmax, the group reduction
by mean. Where inputs are small, the right choice is worked out by hand in the comments.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from lacache_core import NACL, KNorm, KNormDecode, Scissorhands, SnapKV
from references import reference_snapkv, window_attention

GEN = torch.Generator().manual_seed(11)


def gqa_inputs(n=40, heads=4, kv_heads=2, d=8, q=None):
    query = torch.randn(1, heads, q or n, d, generator=GEN)
    key = torch.randn(1, kv_heads, n, d, generator=GEN)
    return query, key


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel", [1, 5, 7])
def test_snapkv_matches_the_reference_rule(pooling, kernel):
    query, key = gqa_inputs()
    policy = SnapKV(cache_size=16, window_size=6, kernel_size=kernel, pooling=pooling)
    policy.observe(0, query, key, scaling=query.shape[-1] ** -0.5)
    ours = policy.compact(key.shape[2], 1)[0].tolist()
    assert ours == reference_snapkv(query, key, 16, 6, kernel, pooling)


# ----------------------------------------------------------------------------- KNorm
def test_knorm_keeps_lowest_norm_keys_and_skips_the_first_layers():
    # one head; norms 5, 1, 3, 2, 4 at slots 0..4; a budget of 2 keeps slots 1 and 3 (norms 1 and 2)
    key = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])[None, None, :, None] * torch.tensor([0.6, 0.8])
    query = torch.zeros(1, 1, 5, 2)
    policy = KNorm(cache_size=2, skip_layers=1)
    for layer in range(2):
        policy.observe(layer, query, key, scaling=1.0)
    keep = policy.compact(5, 2)
    assert keep[0] is None and keep[1].tolist() == [[1, 3]]  # layer 0 is skipped: the prompt stays whole


def test_knorm_matches_the_reference_rule():
    query, key = gqa_inputs(n=30)
    policy = KNorm(cache_size=12, skip_layers=0)
    policy.observe(0, query, key, scaling=1.0)
    ours = policy.compact(30, 1)[0].tolist()
    reference = key.norm(dim=-1).argsort(dim=-1)[0, :, :12]  # L2NormCluster: sort by norm, keep the first C
    assert ours == [sorted(row.tolist()) for row in reference]


def test_knorm_decode_evicts_the_highest_norm_key_each_step():
    # cache 3, no protection. Norms arrive as 1, 4, 2 (prompt), then 3, then 0.5:
    # step 1: {1, 4, 2, 3} -> drop the 4 (slot 1) -> positions 0, 2, 3 (norms 1, 2, 3)
    # step 2: {1, 2, 3, 0.5} -> drop the 3 (position 3) -> positions 0, 2, 4
    norms = [1.0, 4.0, 2.0, 3.0, 0.5]
    keys = torch.tensor(norms)[None, None, :, None] * torch.tensor([1.0, 0.0])
    policy = KNormDecode(cache_size=3)
    policy.bind(1)
    held = keys[:, :, :3]
    for t in (3, 4):
        held = torch.cat([held, keys[:, :, t:t + 1]], 2)
        policy.record(0, held.shape[2])
        policy.observe(0, torch.zeros(1, 1, 1, 2), held, scaling=1.0)
        keep = policy.settle(0, held.shape[2])
        held = held[:, :, keep[0]]
    assert policy.positions_per_layer() == [[[0, 2, 4]]]


# ----------------------------------------------------------------------------- Scissorhands
def feed(policy, keys, query=None):
    """Record, observe and compact one layer holding ``keys``; returns the kept keys."""
    n = keys.shape[2]
    policy.record(0, n)
    policy.observe(0, torch.zeros(1, 1, 1 if query is None else query, 2), keys, scaling=1.0)
    keep = policy.settle(0, n)
    return keys if keep is None else keys[:, :, keep[0]]


@pytest.mark.parametrize("recent_window,expected", [(0, [0, 1, 2]), (1, [0, 1, 4])])
def test_scissorhands_accumulates_decayed_importance(recent_window, expected):
    # Zero keys: every query spreads its attention evenly over the keys it sees. Prompt of 4: query j gives
    # 1/(j+1) to keys 0..j, so importance 25/12, 13/12, 7/12, 3/12; budget 3 drops position 3. Next step:
    # 4 keys seen, 1/4 each, decay 0.5: 0.5 * (25, 13, 7) / 12 + 1/4 for positions 0, 1, 2 and 1/4 for the
    # new position 4, which goes, unless it is protected as the newest (then position 2 goes).
    policy = Scissorhands(cache_size=3, recent_window=recent_window, importance_decay=0.5)
    policy.bind(1)
    held = feed(policy, torch.zeros(1, 1, 4, 2), query=4)
    feed(policy, torch.cat([held, torch.zeros(1, 1, 1, 2)], 2))
    assert policy.positions_per_layer() == [[expected]]


def test_scissorhands_history_window_counts_the_last_prompt_queries():
    # history_window 2: only queries 2 and 3 count: 1/3 + 1/4 for keys 0..2, 1/4 for key 3 -> key 3 goes;
    # with history_window 1 every key gets 1/4: a tie, so the rule is the window's, not the hand's
    policy = Scissorhands(cache_size=3, history_window=2)
    policy.bind(1)
    feed(policy, torch.zeros(1, 1, 4, 2), query=4)
    assert policy.positions_per_layer() == [[[0, 1, 2]]]
    torch.testing.assert_close(policy._importance[0], torch.full((1, 3), 1 / 3 + 1 / 4))


def test_scissorhands_matches_the_reference_rule_and_samples_reproducibly():
    query, key = gqa_inputs(n=30)
    probs = window_attention(query, key, 30)  # every query of the prompt
    reference = probs.sum(-2)[0]  # reduce_scissorhands_scores with no history window, one pass
    for selection, temperature in (("topk", 1.0), ("sample", 1e-4)):  # a cold sampler takes the top
        policy = Scissorhands(cache_size=10, start_size=2, recent_window=3, selection=selection,
                              temperature=temperature)
        policy.observe(0, query, key, scaling=query.shape[-1] ** -0.5)
        ours = policy.compact(30, 1)[0].tolist()
        top = reference[:, 2:27].topk(5, dim=-1).indices + 2
        assert ours == [[0, 1] + sorted(row.tolist()) + [27, 28, 29] for row in top]
    draws = []
    for seed in (0, 0, 1):
        policy = Scissorhands(cache_size=10, selection="sample", random_seed=seed)
        policy.observe(0, query, key, scaling=query.shape[-1] ** -0.5)
        draws.append(policy.compact(30, 1)[0].tolist())
    assert draws[0] == draws[1] != draws[2]


# ----------------------------------------------------------------------------- NACL
def reference_nacl_top(query, key, budget, proxies):
    """select_nacl_tokens with random_budget 0: proxy rows' attention summed, proxies protected, top-k of the rest."""
    scores = window_attention(query, key, proxies).sum(-2)[0]  # [kvh, n]
    n = key.shape[2]
    top = scores[:, :n - proxies].topk(budget - proxies, dim=-1).indices
    return [sorted(row.tolist()) + list(range(n - proxies, n)) for row in top]


def test_nacl_without_random_share_matches_the_reference_rule():
    query, key = gqa_inputs()
    policy = NACL(cache_size=14, window_size=4, random_ratio=0.0)
    policy.observe(0, query, key, scaling=query.shape[-1] ** -0.5)
    assert policy.compact(40, 1)[0].tolist() == reference_nacl_top(query, key, 14, 4)


def test_nacl_random_share_is_seeded_and_differs_per_head():
    query, key = gqa_inputs()

    def rows(seed, ratio=0.5, temperature=1.0):
        policy = NACL(cache_size=14, window_size=4, random_ratio=ratio, random_seed=seed, temperature=temperature)
        policy.observe(0, query, key, scaling=query.shape[-1] ** -0.5)
        return policy.compact(40, 1)[0].tolist()

    best = reference_nacl_top(query, key, 14, 4)
    by_score = window_attention(query, key, 4).sum(-2)[0, :, :36].topk(5, dim=-1).indices
    first = rows(0)
    assert first == rows(0) and first != rows(1)
    for head, row in enumerate(first):
        assert row[-4:] == [36, 37, 38, 39] and len(set(row)) == 14
        assert set(by_score[head].tolist()) <= set(row)  # half the 10 free slots go to the best scores
    assert rows(3, temperature=1e-4) == best  # a cold sampler draws the next best: plain top-k


def test_sampling_follows_the_softmax_of_the_scores():
    from lacache_core.policies.scoring import sample_by_score, seeded_generator

    # scores 0, log 2, log 5 at temperature 1: one draw picks them with probability 1/8, 2/8, 5/8
    scores = torch.tensor([0.0, math.log(2), math.log(5)])
    picks = torch.tensor([int(sample_by_score(scores, 1, 1.0, seeded_generator(7, i))) for i in range(4000)])
    freq = torch.bincount(picks, minlength=3).double() / 4000
    torch.testing.assert_close(freq, torch.tensor([1 / 8, 2 / 8, 5 / 8], dtype=torch.float64), atol=0.03, rtol=0)


# ----------------------------------------------------------------------------- AdaKV
def test_adakv_head_budgets_by_hand():
    from lacache_core.policies.adakv import head_counts

    # B = 2 per head, 4 slots for 2 heads. Raw scores: the top 4 of all are 4 (head 0) and 3.5, 3.4, 3.3
    # (head 1): head 1 wins 3. Normalized, head 1's flat scores shrink by its top-2 share 6.9 / 13.4 to
    # 1.80, 1.75, ...; head 0 keeps its own (its top 2 hold all its mass): 4, 1.80, 1.75, 1.72 -> 2 and 2.
    scores = torch.tensor([[4.0, 1.72, 0.0, 0.0], [3.5, 3.4, 3.3, 3.2]])
    assert head_counts(scores, 2, normalize=False).tolist() == [1, 3]
    assert head_counts(scores, 2, normalize=True).tolist() == [2, 2]


def reference_adakv(query, key, cache_size, window, kernel, floor_ratio, normalize):
    """AdaKVCluster.update_kv: mean window scores, pooled, heads' budgets from a flattened top-k, a floor.
    (Average pooling here: max pooling makes plateaus of equal scores, where either order is right.)"""
    scores = window_attention(query, key, window)[..., :-window].mean(-2)  # [1, kvh, n - w]
    scores = F.avg_pool1d(scores, kernel, stride=1, padding=kernel // 2)[0]
    base = cache_size - window
    ranked, order = scores.sort(-1, descending=True)
    if normalize:
        ranked = ranked * ranked[:, :base].sum(-1, keepdim=True) / ranked.sum(-1, keepdim=True)
    heads, m = ranked.shape
    counts = torch.zeros(heads, dtype=torch.long).scatter_add_(
        0, ranked.reshape(-1).topk(heads * base).indices // m, torch.ones(heads * base, dtype=torch.long))
    caps = torch.round(counts * (1 - floor_ratio) + int(base * floor_ratio)).long()
    n = key.shape[2]
    return [sorted(order[h, :caps[h]].tolist()) + list(range(n - window, n)) for h in range(heads)]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("floor_ratio", [0.0, 0.2])
def test_adakv_matches_the_reference_rule(normalize, floor_ratio):
    from lacache_core import AdaKV

    query, key = gqa_inputs(n=60, heads=8, kv_heads=4)
    policy = AdaKV(cache_size=20, window_size=6, kernel_size=5, pooling="avg", floor_ratio=floor_ratio,
                   normalize=normalize)
    policy.observe(0, query, key, scaling=query.shape[-1] ** -0.5)
    ours = [row.tolist() for row in policy.compact(60, 1)[0]]
    expected = reference_adakv(query, key, 20, 6, 5, floor_ratio, normalize)
    assert ours == expected
    assert len({len(row) for row in ours}) > 1  # the heads really got different budgets


def test_adakv_stores_each_head_at_its_own_length():
    from lacache_core import AdaKV, CompressedCache, enable_position_shift
    from lacache_core.versions import HAS_CACHE_CLASSES, with_cache
    from tiny import tiny_model

    if not HAS_CACHE_CLASSES:
        pytest.skip("cache objects need transformers >= 4.36")
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    policy = AdaKV(cache_size=24, window_size=4)
    cache = CompressedCache(policy, model.config.num_hidden_layers)
    tokens = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(tokens, **with_cache(cache), use_cache=True)
        model(tokens[:, :1], **with_cache(cache), use_cache=True)
    d = model.config.hidden_size // model.config.num_attention_heads
    lengths = [cache.head_lengths(i) for i in range(cache.num_layers)]
    stored = sum(int(n.sum()) for n in lengths) * d * 4 * 2  # float32 keys and values, batch 1
    padded = sum(int(n.max()) * len(n) for n in lengths) * d * 4 * 2
    assert cache.kv_bytes() == stored < padded
    assert [len(row) for row in policy.positions[0]] == lengths[0].tolist()


# ----------------------------------------------------------------------------- HeadKV
def test_headkv_capacities_by_hand():
    from lacache_core.policies.headkv import head_capacities

    # KVCache-Factory's rule on 1 layer of 2 heads, mean scores 3 and 1 (shares 3/4, 1/4), P = 100,
    # head_beta 1.01: P // 1.01 = 99, pool = 99 * 1 * 2 = 198, floor = 100 - 99 = 1:
    # round(0.75 * 198 + 1) = round(149.5) = 150 (half to even), round(0.25 * 198 + 1) = round(50.5) = 50
    assert head_capacities(torch.tensor([[3.0, 1.0]], dtype=torch.float64), 100, 1.01).tolist() == [[150, 50]]
    # head_beta 2: pool = 50 * 2 = 100, floor = 50: 75 + 50 and 25 + 50
    assert head_capacities(torch.tensor([[3.0, 1.0]], dtype=torch.float64), 100, 2.0).tolist() == [[125, 75]]


def test_headkv_reads_the_reference_format_and_refuses_bad_files(tmp_path):
    import json

    from lacache_core import ConfigError, HeadKV

    good = tmp_path / "scores.json"
    good.write_text(json.dumps({"0-0": [0.5, 1.5], "0-1": [1.0], "1-0": [0.0, 0.2], "1-1": [3.0]}))
    policy = HeadKV(cache_size=20, window_size=4, head_scores=str(good))
    policy.bind(2)
    # P = 16, shares 1, 1, 0.1, 3 over 5.1; P // 1.01 = 15, pool 60, floor 1: per query head
    # round(11.76 + 1) = 13, 13, round(1.18 + 1) = 2, round(35.29 + 1) = 36; then the mean over each KV head's
    # 2 query heads (GQA): 13 for layer 0, 19 for layer 1
    assert policy.caps(query_heads=2, kv_heads=1).view(-1).tolist() == [13, 19]
    for text, match in (("{", "not a JSON object"), (json.dumps({"a-b": [1]}), "'a-b'"),
                        (json.dumps({"0-0": ["x"]}), "'0-0'")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            HeadKV(cache_size=20, window_size=4, head_scores=str(bad))
    with pytest.raises(ConfigError, match="HeadKV.head_scores FILE"):
        HeadKV(cache_size=20, window_size=4)
    with pytest.raises(ConfigError, match="2 layers, the model has 3"):
        HeadKV(cache_size=20, window_size=4, head_scores=str(good)).bind(3)


# ----------------------------------------------------------------------------- ThinK
def test_think_drops_the_channels_least_used_by_the_last_queries():
    from lacache_core import ThinK
    from lacache_core.storage import PrunedChannelStore

    # one head, 4 channels, 6 tokens, every token alike. Queries (1, 2, 1, 3) and keys (3, 1, 1, 2) give
    # channel scores q^2 * k^2 = 9, 4, 1, 36: a ratio of 0.5 drops int(4 * 0.5) = 2 of them, channels 2 and 1
    query = torch.tensor([1.0, 2.0, 1.0, 3.0]).expand(1, 1, 6, 4)
    key = torch.tensor([3.0, 1.0, 1.0, 2.0]).expand(1, 1, 6, 4).clone()
    value = torch.randn(1, 1, 6, 4, generator=GEN)
    policy = ThinK(cache_size=10, window_size=2, pruning_ratio=0.5, unpruned_window=2)
    policy.observe(0, query, key, scaling=0.5)
    assert policy.compact(6, 1) is None  # the prompt fits the budget: every token stays
    channels = policy.channel_keep(0, key)
    assert channels.tolist() == [[0, 3]]
    store = PrunedChannelStore(key, value, channels, whole=2)
    view_key, view_value = store.view()
    assert view_key[0, 0, :4].tolist() == [[3.0, 0.0, 0.0, 2.0]] * 4  # the older 4: channels 1 and 2 dropped
    assert view_key[0, 0, 4:].tolist() == [[3.0, 1.0, 1.0, 2.0]] * 2  # the newest 2 whole
    assert torch.equal(view_value, value)
    assert store.nbytes() == (4 * 2 + 2 * 4 + 6 * 4) * 4 + 2 * 8  # pruned, whole keys, values; the index
    assert policy.channel_keep(0, key) is None  # once per prompt


def reference_think(query, key, cache_size, window, kernel, recent, ratio):
    """SnapKVCluster.update_think then key_pruner_query_driven, per query head (keys repeated, as there):
    the kept keys, and per query head the kept channels."""
    groups = query.shape[1] // key.shape[1]
    rep = key.repeat_interleave(groups, dim=1)
    logits = query[:, :, -window:] @ rep.transpose(2, 3) / math.sqrt(query.shape[-1])
    logits[:, :, :, -window:] += torch.full((window, window), float("-inf")).triu(1)
    scores = logits.softmax(-1, dtype=torch.float32)[..., :-window].sum(-2)
    pooled = F.max_pool1d(scores, kernel, stride=1, padding=kernel // 2)
    top = pooled.topk(cache_size - window, dim=-1).indices
    d = key.shape[-1]
    kept = torch.cat([rep[:, :, :-window].gather(2, top[..., None].expand(-1, -1, -1, d)), rep[:, :, -window:]], 2)
    channel_score = query[..., -32:, :].pow(2).mean(2) * kept.pow(2).mean(2)  # [1, heads, d]
    return kept, channel_score


def think_on(query, key, pruning_ratio):
    """Our ThinK on one layer (cache 20, window 6, kernel 5): its kept keys and the channels it keeps of them."""
    from lacache_core import ThinK

    policy = ThinK(cache_size=20, window_size=6, kernel_size=5, pruning_ratio=pruning_ratio, unpruned_window=5)
    policy.observe(0, query, key, scaling=query.shape[-1] ** -0.5)
    keep = policy.compact(key.shape[2], 1)[0]
    kept_key = key.gather(2, keep[None, :, :, None].expand(1, -1, -1, key.shape[-1]))
    return kept_key, policy.channel_keep(0, kept_key)


def channels_left(dropped, d):
    """Per head, the channels of ``range(d)`` not in ``dropped`` (``[heads, k]``), increasing."""
    return [sorted(set(range(d)) - set(row.tolist())) for row in dropped]


def test_think_matches_the_reference_rule_per_head():
    # MHA: one query head per KV head, where the reference's per-query-head pruning is ours exactly
    query, key = gqa_inputs(n=50, heads=4, kv_heads=4, d=8)
    kept_key, ours = think_on(query, key, 0.4)
    ref_key, channel_score = reference_think(query, key, 20, 6, 5, 5, 0.4)
    # the reference keeps its gathered order; compare the kept tokens as sets of key rows per head
    for h in range(4):
        assert sorted(map(tuple, kept_key[0, h].tolist())) == sorted(map(tuple, ref_key[0, h].tolist()))
    dropped = channel_score.topk(int(8 * 0.4), dim=-1, largest=False).indices[0]  # int(3.2) = 3 channels
    assert ours.tolist() == channels_left(dropped, 8)


def test_think_scores_a_kv_head_by_the_mean_of_its_query_heads():
    # GQA: the reference would prune each query head's copy of the keys on its own; our KV head drops the
    # channels with the lowest mean score over its query heads
    query, key = gqa_inputs(n=50, heads=8, kv_heads=2, d=8)
    kept_key, ours = think_on(query, key, 0.5)
    per_query_head = query[..., -32:, :].pow(2).mean(2) * kept_key.repeat_interleave(4, 1).pow(2).mean(2)
    dropped = per_query_head.view(2, 4, 8).mean(1).topk(4, dim=-1, largest=False).indices
    assert ours.tolist() == channels_left(dropped, 8)


def test_think_refuses_what_would_prune_unrotated_keys():
    from lacache_core import CompressedCache, ConfigError, ThinK
    from lacache_core.versions import HAS_CACHE_CLASSES

    if HAS_CACHE_CLASSES:
        with pytest.raises(ConfigError, match="make_cache.key_rotation every_step cannot be used with make_cache.method think"):
            CompressedCache(ThinK(), 4, key_rotation="every_step")
    with pytest.raises(ConfigError, match="run it with a lacache_core.CompressedCache"):
        ThinK()([(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))])
    with pytest.raises(ConfigError, match="ThinK.key_positions slot is not available for think"):
        ThinK(key_positions="slot")
    with pytest.raises(ConfigError, match=r"ThinK.pruning_ratio must be in \[0.0, 1.0\)"):
        ThinK(pruning_ratio=1.0)

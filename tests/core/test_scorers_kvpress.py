"""KeyDiff, LagKV, Expected Attention and ChunkKV against kvpress's rules, re-derived here in plain loops.

Reference: NVIDIA/kvpress @ 8bb29b9 (``kvpress/presses/keydiff_press.py``, ``lagkv_press.py``,
``expected_attention_press.py``, ``chunkkv_press.py``, ``criticalkv_press.py`` and ``scorer_press.py``). Each ``kvpress_*`` function below
recomputes one press's scores token by token from its formula; the policy's kept slots must be the top ones.
"""
import math

import pytest
import torch

from lacache_core import ChunkKV, ConfigError, CriticalKV, ExpectedAttention, KeyDiff, LagKV, build_policy
from lacache_core.rope import Rotation

THETA, D, HEADS, KV_HEADS = 10000.0, 8, 4, 2
GEN = torch.Generator().manual_seed(11)


def rope_tables(positions):
    """cos and sin ``[m, D]`` of the rotate-half RoPE, written out from its definition."""
    inv = [1.0 / THETA ** (2 * i / D) for i in range(D // 2)]
    angles = torch.tensor([[p * f for f in inv] * 2 for p in positions.flatten().tolist()], dtype=torch.float64)
    return angles.cos().float(), angles.sin().float()


def rotary_fn(x, position_ids):
    cos, sin = rope_tables(position_ids)
    return cos.view(*position_ids.shape, D), sin.view(*position_ids.shape, D)


def rotate(x, positions):
    cos, sin = rope_tables(torch.as_tensor(positions))
    half = D // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def kept(policy, query, key, value, attention=None):
    """The slots ``policy`` keeps after seeing one layer's prompt (``[kv_heads, m]`` or ``[m]``, sorted)."""
    n = key.shape[2]
    policy.bind(1)
    policy.record(0, n)
    if policy.reads_weights:
        policy.read_weights(0, attention)
    policy.observe_values(0, value, Rotation(rotary_fn))
    policy.observe(0, query, key, D ** -0.5)
    return policy.settle(0, n)


def top_slots(scores, count):
    """Per head, the ``count`` best-scored slots, sorted (``scores``: nested lists ``[kv_heads][n]``)."""
    return [sorted(sorted(range(len(row)), key=lambda i: -row[i])[:count]) for row in scores]


def inputs(n):
    query = torch.randn(1, HEADS, n, D, generator=GEN)
    key = torch.randn(1, KV_HEADS, n, D, generator=GEN) * torch.rand(1, KV_HEADS, n, 1, generator=GEN) * 3
    value = torch.randn(1, KV_HEADS, n, D, generator=GEN)
    return query, key, value


def kvpress_keydiff(key):
    """Minus the cosine of each key with the mean of its head's unit keys."""
    out = []
    for h in range(key.shape[1]):
        keys = key[0, h].tolist()
        units = [[x / math.sqrt(sum(y * y for y in k)) for x in k] for k in keys]
        anchor = [sum(u[c] for u in units) / len(units) for c in range(D)]
        norm_a = math.sqrt(sum(a * a for a in anchor))
        out.append([-sum(a * x for a, x in zip(anchor, k)) / (norm_a * math.sqrt(sum(x * x for x in k))) for k in keys])
    return out


def test_keydiff_keeps_the_keys_least_like_the_mean():
    query, key, value = inputs(30)
    ours = kept(KeyDiff(cache_size=12), query, key, value)
    assert ours.tolist() == top_slots(kvpress_keydiff(key), 12)


def kvpress_lagkv(key, value, sinks, lag, cross=False):
    """LagKVPress.score: per head, the sinks and tail at 1; each partition's tokens by the spread of their channels
    min-max scaled by the next partition's range (softmaxed in the partition), keys and values averaged, then ranked."""
    n = key.shape[2]
    parts = (n - sinks) // lag
    end = sinks + parts * lag
    out = []
    for h in range(key.shape[1]):
        row = [1.0] * n
        for p in range(parts - 1):
            both = []
            for states in (key[0, h], value[0, h]):
                ref = states[sinks + (p + 1) * lag: sinks + (p + 2) * lag]
                low, high = ref.min(0).values, ref.max(0).values
                spread = [float(((states[sinks + p * lag + i] - low) / (high - low)).std()) for i in range(lag)]
                total = sum(math.exp(s) for s in spread)
                both.append([math.exp(s) / total for s in spread])
            score = [(a + b) / 2 for a, b in zip(*both)]
            ranks = [sorted(score).index(s) / lag for s in score] if not cross else score
            row[sinks + p * lag: sinks + (p + 1) * lag] = ranks
        assert all(v == 1.0 for v in row[end - lag:])  # the last partition and the remainder are kept
        out.append(row)
    return out


@pytest.mark.parametrize("cross", [False, True])
def test_lagkv_ranks_each_partition_against_the_next(cross):
    query, key, value = inputs(4 + 5 * 6 + 3)  # sinks, five partitions of 6, a remainder of 3
    policy = LagKV(cache_size=4 + 9 + 12, lag_size=6, cross_scoring=cross)  # sinks, 12 scored, a tail of 6 + 3
    reference = kvpress_lagkv(key, value, 4, 6, cross)
    assert kept(policy, query, key, value).tolist() == top_slots(reference, 25)
    if not cross:  # ranks: the four scored partitions give the same share, 12 of their 24 tokens: 3 each
        for row in kept(LagKV(cache_size=25, lag_size=6), query, key, value).tolist():
            assert [sum(4 + p * 6 <= s < 10 + p * 6 for s in row) for p in range(4)] == [3, 3, 3, 3]


def test_lagkv_short_prompt_keeps_the_newest():
    query, key, value = inputs(19)  # one short of sinks + two partitions of 8: no partition has a next one
    assert kept(LagKV(cache_size=10, lag_size=8), query, key, value).tolist() == \
        [list(range(4)) + list(range(13, 19))] * KV_HEADS


def kvpress_expected_attention(pre_query, key, value, sinks, future, use_cov=True, use_vnorm=True, eps=0.0):
    """ExpectedAttentionPress.score from the pre-RoPE queries: the mean and covariance of the queries after the
    sinks, turned by ``R = mean_t (cos_t I + sin_t P)`` over the next ``future`` positions; the expected logit
    ``mu.k / sqrt(d) + k' S k / (2 d)`` softmaxed over the non-sink keys, averaged over each KV head's query heads,
    times the value's norm; the sinks above every score."""
    n = key.shape[2]
    cos, sin = rope_tables(torch.arange(n, n + future))
    P = torch.zeros(D, D)
    P[D // 2:, :D // 2], P[:D // 2, D // 2:] = torch.eye(D // 2), -torch.eye(D // 2)
    R = sum(torch.diag(cos[t]) + sin[t][:, None] * P for t in range(future)) / future
    groups = HEADS // KV_HEADS
    out = []
    for kvh in range(KV_HEADS):
        per_query_head = []
        for h in range(kvh * groups, (kvh + 1) * groups):
            q = pre_query[0, h, sinks:].double()
            mu = q.mean(0)
            cov = (q - mu).T @ (q - mu) / q.shape[0]
            mu, cov = R.double() @ mu, R.double() @ cov @ R.double().T
            logits = []
            for j in range(sinks, n):
                k = key[0, kvh, j].double()
                logits.append(float(mu @ k) / math.sqrt(D) + (float(k @ cov @ k) / D / 2 if use_cov else 0.0))
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            per_query_head.append([w / sum(weights) for w in weights])
        scores = [sum(col) / groups for col in zip(*per_query_head)]
        if use_vnorm:
            scores = [(s + eps) * float(value[0, kvh, sinks + i].norm()) for i, s in enumerate(scores)]
        out.append([max(scores) + 1] * sinks + scores)
    return out


@pytest.mark.parametrize("use_cov,use_vnorm", [(True, True), (False, True), (True, False)])
def test_expected_attention_matches_kvpress(use_cov, use_vnorm):
    n = 40
    pre_query, key, value = inputs(n)
    query = rotate(pre_query, torch.arange(n))  # what the attention reads: rotated at the prompt's positions
    policy = ExpectedAttention(cache_size=16, n_future_positions=64, use_covariance=use_cov, use_vnorm=use_vnorm)
    reference = kvpress_expected_attention(pre_query, key, value, 4, 64, use_cov, use_vnorm)
    assert kept(policy, query, key, value).tolist() == top_slots(reference, 16)


def test_expected_attention_scores_are_not_those_without_the_rotation():
    # The future rotation matters: scored with R = I the choice differs on these inputs, so the test above can fail
    n = 40
    pre_query, key, value = inputs(n)
    policy = ExpectedAttention(cache_size=16, n_future_positions=64)
    ours = kept(policy, rotate(pre_query, torch.arange(n)), key, value).tolist()
    unturned = kvpress_expected_attention(pre_query, key, value, 4, 1, True, True)  # t = n only: near R(n)
    assert ours != top_slots(unturned, 16)


def test_chunkkv_keeps_the_best_whole_chunks_as_kvpress():
    # n = 100 in chunks of 10, budget 40: kvpress keeps int(10 * 0.4) = 4 chunks, the same 4 for every head
    query, key, value = inputs(100)
    policy = ChunkKV(cache_size=40, scorer="keydiff", chunk_length=10)
    scores = kvpress_keydiff(key)
    summed = [sum(col) for col in zip(*scores)]
    chunk_means = [sum(summed[c * 10:(c + 1) * 10]) / 10 for c in range(10)]
    best = sorted(sorted(range(10), key=lambda c: -chunk_means[c])[:4])
    assert kept(policy, query, key, value).tolist() == [s for c in best for s in range(c * 10, c * 10 + 10)]


def test_chunkkv_keeps_the_scorers_window_and_a_short_last_chunk():
    # SnapKV's window (8) and sinks (2) stay; the 45 tokens between are 4 chunks of 10 and one of 5
    query, key, value = inputs(55)
    policy = ChunkKV(cache_size=35, scorer="snapkv", chunk_length=10, start_size=2, window_size=8)
    row = kept(policy, query, key, value).tolist()
    assert row[:2] == [0, 1] and row[-8:] == list(range(47, 55))
    middle = row[2:-8]
    assert len(middle) in (20, 15)  # two chunks: whole ones, or a whole one and the short last one
    starts = sorted({2 + (s - 2) // 10 * 10 for s in middle})
    assert middle == [s for c in starts for s in range(c, min(c + 10, 47))]


def test_chunkkv_refuses_a_budget_without_a_chunk():
    with pytest.raises(ConfigError, match="ChunkKV.cache_size 30 holds no chunk of 20"):
        build_policy("chunkkv", cache_size=30)  # SnapKV's 32-token window leaves no room


def kvpress_projected_norms(value, weight):
    """CriticalKVPress.vwl1norm: per query head, each value times that head's rows of ``o_proj.weight.T``, L1 norm
    over the hidden size; averaged over each KV head's query heads. Nested lists ``[kv_heads][n]``."""
    groups, out = HEADS // KV_HEADS, []
    wo = weight.T.reshape(HEADS, D, -1)
    for kvh in range(KV_HEADS):
        per_head = [[float((value[0, kvh, j] @ wo[h]).abs().sum()) for j in range(value.shape[2])]
                    for h in range(kvh * groups, (kvh + 1) * groups)]
        out.append([sum(col) / groups for col in zip(*per_head)])
    return out


@pytest.mark.parametrize("first_stage_ratio", [0.5, 0.0, 1.0])
def test_criticalkv_two_stages_as_kvpress(first_stage_ratio):
    # scorer KeyDiff (no sinks or window); budget 12 of 30: stage one the scorer's top int(12 * r), then the best
    # (score + 1e-4) * |W_o v|_1 among the rest
    query, key, value = inputs(30)
    value = value * torch.rand(1, KV_HEADS, 30, 1, generator=GEN) * 3  # values of different sizes
    attention = torch.nn.Module()
    attention.o_proj = torch.nn.Linear(HEADS * D, 16, bias=False)
    torch.nn.init.normal_(attention.o_proj.weight, generator=GEN)
    policy = CriticalKV(cache_size=12, scorer="keydiff", first_stage_ratio=first_stage_ratio)
    scores = kvpress_keydiff(key)
    norms = kvpress_projected_norms(value, attention.o_proj.weight.detach())
    expected = []
    for head, row in enumerate(scores):
        first = set(top_slots([row], int(12 * first_stage_ratio))[0])
        weighted = [math.inf if j in first else (s + 1e-4) * norms[head][j] for j, s in enumerate(row)]
        expected.append(top_slots([weighted], 12)[0])
    assert kept(policy, query, key, value, attention).tolist() == expected
    if first_stage_ratio < 1:  # the value norms change the choice, so the test can fail
        assert expected != top_slots(scores, 12)


def test_criticalkv_needs_the_attention_module():
    query, key, value = inputs(30)
    with pytest.raises(ConfigError, match="criticalkv reads each attention's output projection"):
        kept(CriticalKV(cache_size=12, scorer="keydiff"), query, key, value)

"""Every registered method through the same checks, plus a hand-computed selection per method.

Adding a method to ``lacache_core.policies.METHODS`` adds it to the matrix automatically.
"""
import math

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import H2O, LSHE, METHODS, TOVA, CompressedCache, LaCache, build_policy, enable_position_shift, prefill
from lacache_core.versions import with_cache
from tiny import fill_and_generate, method_files, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")
COMPRESSING = [name for name, cls in METHODS.items() if name != "full" and not cls.prefill_only]
SETTINGS = dict(cache_size=40, start_size=4, recent_size=36, span=2, overlap=0, recent_window=8, buffer=8)  # R-KV: compacts every 8 steps
TOKENS = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(5))


def layer_rows(layer):
    """A layer's rows of original positions: ``[n]``, per-head ``[kv_heads, n]``, or per-head ``[n_h]`` tensors."""
    if isinstance(layer, list):
        return [head.tolist() for head in layer]
    return layer.tolist() if layer.dim() == 2 else [layer.tolist()]


def position_rows(kept):
    """Every (layer, head) row of original positions."""
    return [row for layer in kept for row in layer_rows(layer)]


def check_cache(cache, budget, seen, method=""):
    rows = position_rows(cache.kept_positions())
    assert cache.get_seq_length() <= budget, "over budget"
    if seen > budget + 4:
        assert max(map(len, rows)) < seen, "compression silently stopped"
    for row in rows:
        assert len(set(row)) == len(row), "a layer holds a token twice"
        assert row == sorted(row)
        assert row[:4] == list(range(min(4, seen))), "sinks must be kept"
        if method != "tova":  # TOVA may drop the newest token if the newest query ignores it
            assert row[-1] == seen - 1, "the newest token must be kept"


@pytest.mark.parametrize("method", COMPRESSING)
@pytest.mark.parametrize("prefill", [1, 90])
def test_budget_duplicates_sinks(method, prefill):
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    policy = build_policy(method, **SETTINGS)
    budget = policy.max_cache_len(model.config.num_hidden_layers)
    cache = CompressedCache(policy, model.config.num_hidden_layers)
    with torch.no_grad():
        model(TOKENS[:, :prefill], **with_cache(cache), use_cache=True)
        check_cache(cache, budget, prefill, method)
        for t in range(prefill, prefill + 100):
            model(TOKENS[:, t:t + 1], **with_cache(cache), use_cache=True)
            check_cache(cache, budget, t + 1, method)


@pytest.mark.parametrize("method", COMPRESSING)
def test_generate_within_budget(method):
    model = enable_position_shift(tiny_model("qwen2", "sdpa"))
    policy = build_policy(method, **SETTINGS)
    cache = CompressedCache(policy, model.config.num_hidden_layers)
    out = model.generate(TOKENS[:, :10], **with_cache(cache), max_new_tokens=80, min_new_tokens=80, do_sample=False)
    assert out.shape[1] == 90
    check_cache(cache, policy.max_cache_len(model.config.num_hidden_layers), 89, method)


@pytest.mark.parametrize("method", COMPRESSING)
def test_next_step_matches_from_scratch_after_compactions(method):
    """After many compactions, the next logits equal a from-scratch decoder step over the kept keys and
    values, the keys at the method's positions (their slots, or their original positions per head)."""
    from tiny import manual_next_logits

    model = enable_position_shift(tiny_model("llama", "eager"))
    policy = build_policy(method, **SETTINGS)
    cache = CompressedCache(policy, model.config.num_hidden_layers, key_rotation="every_step")  # un-rotated storage
    with torch.no_grad():
        model(TOKENS[:, :90], **with_cache(cache), use_cache=True)
        for t in range(90, 130):
            model(TOKENS[:, t:t + 1], **with_cache(cache), use_cache=True)
        kv = [cache._layer(i) for i in range(cache.num_layers)]
        if policy.position_mode == "original":
            expected = manual_next_logits(model, int(TOKENS[0, 130]), kv, query_pos=130,
                                          key_positions=cache.kept_positions())
        else:
            expected = manual_next_logits(model, int(TOKENS[0, 130]), kv)
        ours = model(TOKENS[:, 130:131], **with_cache(cache), use_cache=True).logits[0, -1]
    assert max(map(len, position_rows(cache.kept_positions()))) < 131  # it did evict
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- hand-computed selections
def one_head(vectors):
    """``[1, 1, n, d]`` from a list of d-vectors."""
    return torch.tensor(vectors, dtype=torch.float32)[None, None]


def test_tova_keeps_what_the_newest_query_attends_to():
    strengths = [0, 5, 1, 4, 2, 3, 0.5, 6]  # key j = strengths[j] * e0, query = e0
    keys = one_head([[a, 0, 0, 0] for a in strengths])
    query = one_head([[1, 0, 0, 0]])
    policy = TOVA(cache_size=6, start_size=1)
    policy.observe(0, query, keys, scaling=1.0)
    keep = policy.compact(8, 1)
    # sink 0, then the 5 strongest of slots 1..7: 7 (6), 1 (5), 3 (4), 5 (3), 4 (2)
    assert [row.tolist() for row in keep] == [[0, 1, 3, 4, 5, 7]]


def test_h2o_accumulates_attention_over_steps():
    policy = H2O(cache_size=5, start_size=1, recent_ratio=0.25)  # recent = 1, heavy = 3
    keys = one_head([[0, 0], [2, 0], [0, 2], [1, 1], [0, 0], [-2, 0], [0, 0]])
    queries = [one_head([[1, 0]]), one_head([[0, 1]])]
    for q in queries:
        policy.observe(0, q, keys, scaling=1.0)
    mass = [0.0] * 7
    for q in ([1, 0], [0, 1]):
        logits = [q[0] * k[0] + q[1] * k[1] for k in keys[0, 0].tolist()]
        z = sum(math.exp(x) for x in logits)
        mass = [m + math.exp(x) / z for m, x in zip(mass, logits)]
    middle = sorted(range(1, 6), key=lambda j: -mass[j])[:3]
    expected = [0] + sorted(middle) + [6]
    assert [row.tolist() for row in policy.compact(7, 1)] == [expected] == [[0, 1, 2, 3, 6]]


def test_lshe_prefers_keys_hashing_like_the_query():
    torch.manual_seed(0)
    q = torch.randn(8)
    keys = [q.tolist() if j % 2 == 0 else (-q).tolist() for j in range(10)]  # even slots: same hash, odd: opposite
    policy = LSHE(cache_size=6, start_size=1, recent_window=1, lsh_dim=16)
    policy.observe(0, one_head([q.tolist()]), one_head(keys), scaling=1.0)
    # sink 0 and recent 9 kept; the 4 others must be the even slots 2, 4, 6, 8 (all 16 bits agree; odd: none)
    assert [row.tolist() for row in policy.compact(10, 1)] == [[0, 2, 4, 6, 8, 9]]


def test_lacache_paper_layout_token_on_consecutive_layers():
    """Paper prose, L = 32, S = 8, O = 4: token j of a group sits on layers [4j, 4j + 7], edges widened."""
    policy = LaCache(256, 8, 4, 4, ladder_layout="paper")
    n = 0
    for _ in range(259):
        n = (0 if policy.positions is None else policy.positions.shape[1]) + 1
        policy.compact(n, 32)
    layers = policy.positions_per_layer()
    holders = {j: [i for i in range(32) if 4 + j in layers[i]] for j in range(7)}
    for j in range(7):
        lo, hi = 4 * j, min(4 * j + 7, 31)
        assert set(range(lo, hi + 1)) <= set(holders[j])
    assert holders[0] == list(range(0, 8)) and holders[6] == list(range(24, 32))
    assert holders[1] == list(range(0, 12)) and holders[5] == list(range(20, 32))  # widened at the ends
    assert {len(row) for row in layers} == {len(layers[0])}


# ----------------------------------------------------------------------------- prefill-time methods
from lacache_core import PyramidInfer, PyramidKV, SnapKV  # noqa: E402

PREFILL = [name for name, cls in METHODS.items() if cls.prefill_only]
PREFILL_SETTINGS = dict(cache_size=40, start_size=4, window_size=8, beta=2, chunk_length=4, lag_size=16)  # ChunkKV: 7 whole chunks


@pytest.mark.parametrize("method", PREFILL)
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_prefill_methods_compress_once_then_grow(method, family):
    model = enable_position_shift(tiny_model(family, "eager"))
    L = model.config.num_hidden_layers
    policy = build_policy(method, **PREFILL_SETTINGS, **method_files(model.config))
    budgets = policy.layer_budgets(L, 120)
    cache = CompressedCache(policy, L)
    with torch.no_grad():
        prefill(model, TOKENS[:, :120], cache, tokenizer=tiny_tokenizer())  # a plain forward, but for KVzip's passes
        for step in range(5):
            model(TOKENS[:, 120 + step:121 + step], **with_cache(cache), use_cache=True)
    if method == "kvzip":  # every (layer, KV head) keeps cache_size prompt tokens on average, and the 5 decoded
        rows = position_rows(cache.kept_positions())
        assert sum(map(len, rows)) == len(rows) * (policy.cache_size + 5) and min(map(len, rows)) < max(map(len, rows))
        assert all(len(set(r)) == len(r) and r == sorted(r) and r[-5:] == list(range(120, 125)) for r in rows)
        return
    for layer, pos in enumerate(cache.kept_positions()):
        rows = layer_rows(pos)
        if isinstance(pos, list):  # heads of different lengths
            assert cache.get_seq_length(layer) == max(map(len, rows))
            if method == "adakv":  # the layer's total is the budget (rounding aside)
                assert abs(sum(map(len, rows)) - len(rows) * (budgets[layer] + 5)) <= len(rows)
            elif method == "duo_attention":  # streaming heads sinks and window, retrieval heads the prompt; + 5
                assert list(map(len, rows)) == [h + 5 for h in policy.head_budgets(layer, 120)]
            else:  # HeadKV: each head its cap from the scores, plus sinks, window and the 5 decoded
                extra = policy.start_size + policy.window_size + 5
                assert list(map(len, rows)) == [c + extra for c in policy._caps[layer].tolist()]
        for row in rows:
            if not isinstance(pos, list):
                assert len(row) == budgets[layer] + 5 == cache.get_seq_length(layer)
            assert len(set(row)) == len(row) and row == sorted(row)
            assert row[:4] == [0, 1, 2, 3] and row[-13:] == list(range(112, 125))  # sinks, window, decoded


def test_prefill_methods_rejected_in_token_by_token_harness():
    from lacache_core import ConfigError
    from harness.streaming import stream_perplexity

    with pytest.raises(ConfigError, match="prefill-time"):
        stream_perplexity(tiny_model("llama", "eager"), None, [], SnapKV(cache_size=40, window_size=8))


def test_snapkv_selects_per_head_with_pooling():
    # 2 KV heads, 1 query head each; prefix slots 0..9, window = last 2 slots (10, 11)
    d, n = 4, 12
    key = torch.zeros(1, 2, n, d)
    key[0, 0, 3, 0] = key[0, 0, 7, 0] = 8.0  # head 0: slots 3 and 7 stand out along e0
    key[0, 1, 5, 1] = 8.0                     # head 1: slot 5 stands out along e1
    query = torch.zeros(1, 2, 2, d)
    query[0, 0, :, 0] = 1.0
    query[0, 1, :, 1] = 1.0
    exact = SnapKV(cache_size=5, start_size=1, window_size=2, kernel_size=1)
    exact.observe(0, query, key, scaling=1.0)
    keep = exact.compact(n, 1)[0]
    assert keep[0].tolist() == [0, 3, 7, 10, 11]
    assert 5 in keep[1].tolist()  # its other prefix pick is a tie among equal scores
    # with max pooling over 3 neighbours, slot 5's peak also lifts 4 and 6 on head 1 (ties: lowest slot first)
    pooled = SnapKV(cache_size=6, start_size=1, window_size=2, kernel_size=3)
    pooled.observe(0, query, key, scaling=1.0)
    assert pooled.compact(n, 1)[0][1].tolist() == [0, 4, 5, 6, 10, 11]


def test_snapkv_scores_and_pools_the_prefix_only():
    # One head, n = 12, window = slots 10, 11; keys along e0 with logits 4, 3, 2 at slots 3, 4, 5 and 10
    # at slot 10 (the window), queries e0. KVCache-Factory scores the prefix columns only, so avg pooling
    # over 3 neighbours gives slot 4 (e^4 + e^3 + e^2) / 3, the best prefix score, and slot 9 just
    # (e^0 + e^0) / 3: pooling across the window's edge would lift slot 9 by e^10 / 3 instead.
    n = 12
    key = torch.zeros(1, 1, n, 2)
    key[0, 0, [3, 4, 5, 10], 0] = torch.tensor([4.0, 3.0, 2.0, 10.0])
    query = torch.zeros(1, 1, 2, 2)
    query[..., 0] = 1.0
    policy = SnapKV(cache_size=3, window_size=2, kernel_size=3, pooling="avg")
    assert policy.start_size == 0  # the reference keeps no sinks
    policy.observe(0, query, key, scaling=1.0)
    assert policy.compact(n, 1)[0].tolist() == [[4, 10, 11]]


def test_pyramid_budgets_by_hand():
    # KVCache-Factory's integer schedule. C = 256, w = 32: P = 224, beta 20 -> lo = 224 // 20 = 11,
    # hi = 448 - 11 = 437, step = (437 - 11) // 29 = 14 over 30 layers
    policy = PyramidKV(cache_size=256, window_size=32, beta=20)
    assert policy.layer_budgets(30) == [32 + 437 - 14 * i for i in range(30)]
    assert policy.layer_budgets(30, 5000) == policy.layer_budgets(30)
    # a prompt of 460 (>= 2P = 448, but n - w = 428 <= hi): hi = 428, lo = 448 - 428 = 20, step = 408 // 29 = 14
    assert policy.layer_budgets(30, 460) == [32 + 428 - 14 * i for i in range(30)]
    # 256 <= n < 448: SnapKV's budget everywhere; n < 256: the whole prompt everywhere
    assert policy.layer_budgets(30, 300) == [256] * 30 and policy.layer_budgets(30, 200) == [200] * 30
    # PyramidInfer: decay 0.5 on 3 layers, C = 70: weights 1, 1/2, 1/4 scaled to average 70
    assert PyramidInfer(cache_size=70, start_size=1, window_size=2, decay=0.5).layer_budgets(3) == [120, 60, 30]


def test_pyramidkv_keeps_a_short_prompt_whole():
    # 4 layers, C = 40, w = 8: for a 36-token prompt the schedule would give deep layers fewer than 36
    # slots, but the reference keeps every prompt shorter than C whole in every layer
    model = enable_position_shift(tiny_model("llama", "eager"))
    cache = CompressedCache(PyramidKV(cache_size=40, window_size=8, beta=2), model.config.num_hidden_layers)
    with torch.no_grad():
        model(TOKENS[:, :36], **with_cache(cache), use_cache=True)
    assert [cache.get_seq_length(i) for i in range(cache.num_layers)] == [36] * cache.num_layers


@pytest.mark.parametrize("key_positions", [None, "slot"])
@pytest.mark.parametrize("method", PREFILL)
def test_prefill_methods_next_step_matches_from_scratch(method, key_positions):
    from tiny import manual_next_logits

    if key_positions == "slot" and METHODS[method].ragged:
        pytest.skip("heads of different lengths have no common slots: slot positions are refused")
    if METHODS[method].prunes_channels:
        pytest.skip("prunes channels of rotated keys, so it stores keys rotated: test_think_next_step_matches_from_scratch")
    model = enable_position_shift(tiny_model("llama", "eager"))
    policy = build_policy(method, key_positions=key_positions, **PREFILL_SETTINGS,
                          **method_files(model.config))
    cache = CompressedCache(policy, model.config.num_hidden_layers, key_rotation="every_step")  # un-rotated storage
    with torch.no_grad():
        prefill(model, TOKENS[:, :120], cache, tokenizer=tiny_tokenizer())
        kv = [(cache._stores[i].heads, None) if cache.head_lengths(i) is not None else cache._layer(i) for i in range(cache.num_layers)]
        if key_positions is None:  # the reference default: kept keys at their original positions
            assert policy.position_mode == "original"
            expected = manual_next_logits(model, int(TOKENS[0, 120]), kv, query_pos=120,
                                          key_positions=cache.kept_positions())
        else:  # the ablation: kept keys at their slots, the query after them
            expected = manual_next_logits(model, int(TOKENS[0, 120]), kv)
        ours = model(TOKENS[:, 120:121], **with_cache(cache), use_cache=True).logits[0, -1]
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_think_next_step_matches_from_scratch():
    # ThinK keeps SnapKV's tokens; its next step equals a from-scratch step over SnapKV's kept keys (rotated at
    # their original positions) with the dropped channels zeroed in all but the newest unpruned_window of them
    from tiny import manual_next_logits

    model = enable_position_shift(tiny_model("llama", "eager"))
    L, d = model.config.num_hidden_layers, model.config.hidden_size // model.config.num_attention_heads
    settings = dict(PREFILL_SETTINGS, pruning_ratio=0.5, unpruned_window=6)
    think = CompressedCache(build_policy("think", **settings), L)
    snap = CompressedCache(build_policy("snapkv", **settings), L, key_rotation="incremental")
    with torch.no_grad():
        model(TOKENS[:, :120], **with_cache(think), use_cache=True)
        model(TOKENS[:, :120], **with_cache(snap), use_cache=True)
        assert all(torch.equal(a, b) for a, b in zip(think.kept_positions(), snap.kept_positions()))
        kvh, element, index = model.config.num_key_value_heads, 4, 8
        # the memory saved is real: the older keys hold half their channels (each layer adds its channel index)
        saved = sum((snap.get_seq_length(i) - 6) * kvh * (d // 2) * element - kvh * (d // 2) * index for i in range(L))
        assert snap.kv_bytes() - think.kv_bytes() == saved > 0
        kv = []
        for i in range(L):
            key, value = (t.clone() for t in snap._layer(i))
            kept = think._stores[i].channels  # [kv_heads, d / 2]
            assert kept.shape == (model.config.num_key_value_heads, d // 2)
            dropped = torch.ones(kept.shape[0], d, dtype=torch.bool).scatter_(-1, kept, False)
            older = key[:, :, :-6]
            older[dropped[None, :, None, :].expand_as(older)] = 0
            kv.append((key, value))
        expected = manual_next_logits(model, int(TOKENS[0, 120]), kv, query_pos=120,
                                      key_positions=snap.kept_positions(), rotated=True)
        ours = model(TOKENS[:, 120:121], **with_cache(think), use_cache=True).logits[0, -1]
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", PREFILL)
def test_prefill_methods_generate(method):
    model = enable_position_shift(tiny_model("qwen2", "sdpa"))
    L = model.config.num_hidden_layers
    policy = build_policy(method, **PREFILL_SETTINGS, **method_files(model.config))
    cache = CompressedCache(policy, L)
    out = fill_and_generate(model, TOKENS[:, :100], cache, 20)
    assert out.shape[1] == 120
    budgets = [b + 19 for b in policy.layer_budgets(L, 100)]
    if policy.ragged:  # each layer's heads share its budget (up to rounding) and grow by the 19 tokens fed back
        kvh = model.config.num_key_value_heads
        heads = [cache.head_lengths(i) for i in range(L)]  # None where every head holds the same (DuoAttention)
        heads = [torch.full((kvh,), cache.get_seq_length(i)) if h is None else h for i, h in enumerate(heads)]
        totals = [int(h.sum()) for h in heads]
        if method == "adakv":
            assert all(abs(t - kvh * b) <= kvh for t, b in zip(totals, budgets))
        elif method == "duo_attention":
            assert totals == [sum(policy.head_budgets(i, 100)) + 19 * kvh for i in range(L)]
        elif method == "kvzip":  # the model's budget, shared over layers and heads by the scores
            assert sum(totals) == kvh * L * (policy.cache_size + 19)
            return
        else:  # HeadKV shares the budget over all layers
            assert abs(sum(totals) - kvh * sum(budgets)) <= kvh * L
        assert all(int(h.min()) >= 19 + PREFILL_SETTINGS["window_size"] for h in heads)
    else:
        assert [cache.get_seq_length(i) for i in range(L)] == budgets


def test_pyramidinfer_selects_by_head_averaged_attention():
    d, n = 4, 12
    key = torch.zeros(1, 2, n, d)
    key[0, 0, 3, 0] = 8.0  # head 0 attends slot 3 strongly
    key[0, 1, 6, 1] = 4.0  # head 1 attends slot 6 less
    query = torch.zeros(1, 2, 2, d)
    query[0, 0, :, 0] = 1.0
    query[0, 1, :, 1] = 1.0
    policy = PyramidInfer(cache_size=4, start_size=1, window_size=2)
    policy.observe(0, query, key, scaling=1.0)
    assert policy.compact(n, 1)[0].tolist() == [0, 3, 10, 11]  # one choice for both heads


# ----------------------------------------------------------------------------- bounded prefill
def test_chunked_prefill_equals_whole_prefill_without_eviction():
    from lacache_core import prefill

    model = enable_position_shift(tiny_model("llama", "sdpa"))
    whole = prefill(model, TOKENS[:, :150], build_cache(model, "lacache", cache_size=1000, span=2))
    chunked = prefill(model, TOKENS[:, :150], build_cache(model, "lacache", cache_size=1000, span=2), chunk_size=32)
    torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", COMPRESSING)
def test_chunked_prefill_stays_within_budget_plus_chunk(method):
    from lacache_core import prefill

    model = enable_position_shift(tiny_model("llama", "eager"))
    cache = build_cache(model, method, **SETTINGS)
    lengths = []
    original = cache.attend

    def record(layer_idx, *args, **kwargs):
        if layer_idx == cache.num_layers - 1:
            lengths.append(cache.get_seq_length(layer_idx))  # before compaction: the peak of each chunk
        return original(layer_idx, *args, **kwargs)

    cache.attend = record
    prefill(model, TOKENS[:, :200], cache, chunk_size=16)
    budget = cache.policy.max_cache_len(model.config.num_hidden_layers)
    assert len(lengths) == 13 and max(lengths) <= budget + 16
    check_cache(cache, budget, 200, method)


def test_chunked_prefill_rejected_for_prefill_time_methods():
    from lacache_core import ConfigError, prefill

    model = enable_position_shift(tiny_model("llama", "eager"))
    with pytest.raises(ConfigError, match="prefill.chunk_size"):
        prefill(model, TOKENS[:, :50], build_cache(model, "snapkv", **PREFILL_SETTINGS), chunk_size=8)


def build_cache(model, method, **settings):
    return CompressedCache(build_policy(method, **settings), model.config.num_hidden_layers)


def test_key_positions_flag_is_checked():
    from lacache_core import ConfigError

    with pytest.raises(ConfigError, match="H2O.key_positions must be one of"):
        CompressedCache(build_policy("h2o", key_positions="sideways", cache_size=40), 4)
    assert build_policy("lacache").settings()["key_positions"] == "slot"
    assert build_policy("snapkv").settings()["key_positions"] == "original"


def test_a_mask_one_past_the_keys_is_widened_without_hiding_the_newest_key():
    """transformers 4.48 builds a decoding step's mask one column past the keys, that column masked; a layer
    holding more slots than layer 0 (AdaKV, HeadKV, KVzip) must still see its newest key."""
    if Version(transformers.__version__) < Version("4.48"):
        pytest.skip("the extension-point integration needs transformers >= 4.48")
    from lacache_core.patches.modern import _fit_mask

    low = torch.finfo(torch.float32).min
    mask = torch.tensor([0.0, 0.0, 0.0, 0.0, low])[None, None, None]  # 4 keys visible, 1 future column
    assert (_fit_mask(mask, 7) == 0).all() and _fit_mask(mask, 7).shape[-1] == 7
    assert (_fit_mask(mask, 3) == 0).all() and _fit_mask(mask, 3).shape[-1] == 3
    # a layer holding one slot more than layer 0 has exactly the mask's width, and its newest key is the last column
    assert (_fit_mask(mask, 5) == 0).all() and _fit_mask(mask, 5).shape[-1] == 5
    causal = torch.tensor([[0.0, low], [0.0, 0.0]])[None, None]  # a prefill's causal block: nothing trimmed
    assert torch.equal(_fit_mask(causal, 3)[..., 1:], causal)

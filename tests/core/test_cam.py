"""CaM: the merge worked out by hand, the reference's decode-time rule re-derived, and next-step logits."""
import io

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import CompressedCache, ConfigError, StreamingLLM, build_policy, enable_position_shift
from lacache_core.policies.cam import CAM
from lacache_core.policies.scoring import seeded_generator
from lacache_core import GEAR
from lacache_core import KIVI
from lacache_core.quant import KIVIStore
from lacache_core.versions import with_cache
from tiny import manual_next_logits, tiny_model

needs_cache = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                 reason="cache objects need transformers >= 4.36")
TOKENS = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(11))


def one_head(vectors):
    """``[1, 1, n, d]`` from a list of d-vectors."""
    return torch.tensor(vectors, dtype=torch.float64)[None, None]


def evict_once(policy, query, keys, values):
    """One observed step of a one-layer policy: the kept slots and the merged values at them."""
    n = keys.shape[2]
    policy.observe(0, query, keys, scaling=1.0)
    (keep,) = policy.compact(n, 1)
    return keep.tolist(), policy.merge_values(0, keep, values)[:, :, keep]


# ----------------------------------------------------------------------------- by hand
def test_one_eviction_by_hand():
    """Query e0, keys log(w) e0 with w = 4, 1, 2, 2: attention 4/9, 1/9, 2/9, 2/9. Slot 1 leaves (1 sink,
    2 recent); its targets are slots 2 and 3 (M = 2): p = (1/9) / mean(2/9, 2/9) = 1/2, so each target gains
    p * v1 / M = v1 / 4 = (1, 2)."""
    keys = one_head([[torch.tensor(w).log().item(), 0] for w in (4.0, 1.0, 2.0, 2.0)])
    values = one_head([[1, 0], [4, 8], [0, 1], [2, 2]])
    policy = CAM(cache_size=3, start_size=1, merge_budget=2, merge_mode="expected")
    keep, merged = evict_once(policy, one_head([[1, 0]]), keys, values.clone())
    assert keep == [0, 2, 3]
    assert merged[0, 0].tolist() == [[1, 0], [1, 3], [3, 4]]


def test_one_eviction_sampled_is_all_or_nothing_and_seeded():
    """With p = 1/2 the sampled merge adds all of v1 / M or nothing, decided by the seed alone."""
    keys = one_head([[torch.tensor(w).log().item(), 0] for w in (4.0, 1.0, 2.0, 2.0)])
    values = one_head([[1, 0], [4, 8], [0, 1], [2, 2]])
    outcomes = []
    for seed in range(12):
        runs = [evict_once(CAM(cache_size=3, start_size=1, merge_budget=2, random_seed=seed), one_head([[1, 0]]),
                           keys, values.clone())[1][0, 0].tolist() for _ in range(2)]
        assert runs[0] == runs[1]  # the same seed, the same draw
        assert runs[0] in ([[1, 0], [0, 1], [2, 2]], [[1, 0], [2, 5], [4, 6]])
        outcomes.append(runs[0][1] == [2, 5])
    assert any(outcomes) and not all(outcomes)


def test_several_evictions_merge_in_order_by_hand():
    """A zero query attends uniformly, so p = 1 everywhere. Slots 1 and 2 leave (1 sink, 2 recent, M = 2):
    v2' = v2 + v1/2 = (2, 4); v3' = v3 + v1/2 + v2'/2 = (4, 3); v4' = v4 + v2'/2 = (3, 4). Slot 1's value reaches
    slot 3 both directly and through slot 2, which carries it on when it leaves too."""
    values = one_head([[0, 0], [4, 0], [0, 4], [1, 1], [2, 2]])
    policy = CAM(cache_size=3, start_size=1, merge_budget=2)
    keep, merged = evict_once(policy, one_head([[0, 0]]), one_head([[1, 0]] * 5), values.clone())
    assert keep == [0, 3, 4]
    assert merged[0, 0].tolist() == [[0, 0], [4, 3], [3, 4]]
    assert values[0, 0].tolist() == [[0, 0], [4, 0], [0, 4], [1, 1], [2, 2]]  # the step's own values untouched


# ----------------------------------------------------------------------------- the reference's rule
def reference_cam_stream(queries, keys, values, start, recent, merge_num, masks):
    """zyxxmu/cam's StartRecentKVCache_cam, re-derived for one token per step (multi-head attention, batch 1).

    After each step's attention the running sum of attention gains the step's row (new slot included);
    while the cache holds more than ``start + recent`` slots, with ``s = n - recent`` the token at ``s - 1``
    leaves and, per head, ``p = acc[s-1] / mean(acc[s : s+merge_num])`` (NaN as 0, clipped to [0, 1]); where
    the head's draw ``masks(step, p)`` is 1, ``v[s : s+merge_num] += v[s-1] / merge_num``. The evicted column
    of the running sum is dropped. Returns the cache's keys and values after the last step.
    """
    k_cache, v_cache, acc = None, None, None
    for step in range(keys.shape[2]):
        k_new, v_new = keys[:, :, step:step + 1], values[:, :, step:step + 1]
        k_cache = k_new if k_cache is None else torch.cat([k_cache, k_new], 2)
        v_cache = v_new if v_cache is None else torch.cat([v_cache, v_new], 2)
        q = queries[:, :, step:step + 1]
        attn = torch.softmax(q.float() @ k_cache.float().transpose(2, 3), -1)[:, :, 0]  # [1, h, n], float32
        acc = attn if acc is None else torch.cat([acc + attn[..., :acc.shape[-1]], attn[..., acc.shape[-1]:]], -1)
        n = k_cache.shape[2]
        if n <= start + recent:
            continue
        s = n - recent
        prob = acc[..., s - 1] / acc[..., s:s + merge_num].mean(-1)  # [1, h]
        prob = torch.nan_to_num(prob, nan=0.0).clamp(0, 1)
        mask = masks(step, prob.double())
        v_cache = v_cache.clone()
        v_cache[:, :, s:s + merge_num] += (v_cache[:, :, s - 1] * mask[..., None] / merge_num)[:, :, None]
        acc = torch.cat([acc[..., :s - 1], acc[..., s:]], -1)
        k_cache = torch.cat([k_cache[:, :, :start], k_cache[:, :, s:]], 2)
        v_cache = torch.cat([v_cache[:, :, :start], v_cache[:, :, s:]], 2)
    return k_cache, v_cache


def policy_stream(policy, queries, keys, values, k_cache=None, v_cache=None):
    """The same stream through the policy's observe / compact / merge_values, one token per step, continuing
    from ``k_cache`` and ``v_cache`` if given."""
    for step in range(keys.shape[2]):
        k_new, v_new = keys[:, :, step:step + 1], values[:, :, step:step + 1]
        k_cache = k_new if k_cache is None else torch.cat([k_cache, k_new], 2)
        v_cache = v_new if v_cache is None else torch.cat([v_cache, v_new], 2)
        policy.observe(0, queries[:, :, step:step + 1], k_cache, scaling=1.0)
        keep = policy.compact(k_cache.shape[2], 1)
        if keep is not None:
            v_cache = policy.merge_values(0, keep[0], v_cache)[:, :, keep[0]]
            k_cache = k_cache[:, :, keep[0]]
    return k_cache, v_cache


@pytest.mark.parametrize("mode", ["expected", "sample"])
@pytest.mark.parametrize("start, recent, merge", [(4, 20, 16), (2, 6, 16), (0, 9, 3)])
def test_decode_matches_the_reference_rule(mode, start, recent, merge):
    g = torch.Generator().manual_seed(3)
    heads, steps, d, seed = 3, 70, 8, 5
    queries, keys, values = (torch.randn(1, heads, steps, d, generator=g, dtype=torch.float64) for _ in range(3))
    queries = queries * 2  # peaked attention: probabilities spread over (0, 1)

    def masks(step, prob):  # the draws the reference's torch.bernoulli makes, from the policy's seeded stream
        if mode == "expected":
            return prob
        draws = torch.rand(prob.shape[-1], generator=seeded_generator(seed, 0, step + 1), dtype=torch.float64)
        return (draws < prob[0]).to(prob.dtype)[None]

    ref_k, ref_v = reference_cam_stream(queries, keys, values, start, recent, merge, masks)
    policy = CAM(cache_size=start + recent, start_size=start, merge_budget=merge, merge_mode=mode, random_seed=seed)
    ours_k, ours_v = policy_stream(policy, queries, keys, values)
    torch.testing.assert_close(ours_k, ref_k, rtol=0, atol=0)
    torch.testing.assert_close(ours_v, ref_v, rtol=1e-6, atol=1e-6)
    plain = values[:, :, [*range(start), *range(steps - recent, steps)]]
    assert (ours_v - plain).abs().max() > 1e-3  # it did merge


def test_sampled_probabilities_are_not_all_zero_or_one():
    """The reference-rule test above only tells sampling from its mean if draws can go both ways."""
    g = torch.Generator().manual_seed(3)
    queries, keys = (torch.randn(1, 3, 40, 8, generator=g, dtype=torch.float64) for _ in range(2))
    policy = CAM(cache_size=24, start_size=4)
    policy.observe(0, queries * 2, keys, scaling=1.0)
    policy.compact(40, 1)
    prob = policy._merge_prob[0]
    assert ((prob > 0.05) & (prob < 0.95)).any()


# ----------------------------------------------------------------------------- in a model
@needs_cache
@pytest.mark.parametrize("mode", ["expected", "sample"])
def test_next_step_uses_kept_keys_and_merged_values(mode):
    """After many compactions the next logits equal a from-scratch decoder step over the cache's kept keys at
    their slots and its merged values. Layer 0 holds StreamingLLM's keys (same slots, keys never merged) and
    sinks, but other window values; the next logits differ from StreamingLLM's."""
    model = enable_position_shift(tiny_model("llama", "eager"))
    layers = model.config.num_hidden_layers
    cam = CompressedCache(CAM(cache_size=40, start_size=4, merge_mode=mode), layers, key_rotation="every_step")
    sllm = CompressedCache(StreamingLLM(start_size=4, recent_size=36), layers, key_rotation="every_step")
    with torch.no_grad():
        for cache in (cam, sllm):
            model(TOKENS[:, :90], **with_cache(cache), use_cache=True)
            for t in range(90, 130):
                model(TOKENS[:, t:t + 1], **with_cache(cache), use_cache=True)
        assert torch.equal(cam.kept_positions(), sllm.kept_positions())
        kv = [cam._layer(i) for i in range(layers)]
        (k, v), (k0, v0) = kv[0], sllm._layer(0)
        torch.testing.assert_close(k, k0, rtol=0, atol=0)
        torch.testing.assert_close(v[:, :, :4], v0[:, :, :4], rtol=0, atol=0)
        assert (v[:, :, 4:] - v0[:, :, 4:]).abs().max() > 1e-4
        expected = manual_next_logits(model, int(TOKENS[0, 130]), kv)
        ours = model(TOKENS[:, 130:131], **with_cache(cam), use_cache=True).logits[0, -1]
        streaming = model(TOKENS[:, 130:131], **with_cache(sllm), use_cache=True).logits[0, -1]
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    assert (ours - streaming).abs().max() > 1e-4


@needs_cache
def test_the_evicting_step_attends_to_unmerged_values():
    """Merged values serve the next steps: the step that evicts gives StreamingLLM's logits exactly."""
    model = enable_position_shift(tiny_model("llama", "eager"))
    layers = model.config.num_hidden_layers
    cam = CompressedCache(CAM(cache_size=40, start_size=4, merge_mode="expected"), layers)
    sllm = CompressedCache(StreamingLLM(start_size=4, recent_size=36), layers)
    with torch.no_grad():
        logits = [[model(TOKENS[:, t:t + 1], **with_cache(c), use_cache=True).logits[0, -1] for t in range(43)]
                  for c in (cam, sllm)]
    torch.testing.assert_close(torch.stack(logits[0][:41]), torch.stack(logits[1][:41]), rtol=0, atol=0)
    assert (logits[0][41] - logits[1][41]).abs().max() > 1e-6  # the first step after a merge


@needs_cache
def test_each_row_of_a_batch_merges_as_alone():
    model = enable_position_shift(tiny_model("llama", "eager"))
    layers = model.config.num_hidden_layers
    rows = torch.stack([TOKENS[0, :70], TOKENS[0, 70:140]])
    caches = [CompressedCache(build_policy("cam", cache_size=40, random_seed=3), layers) for _ in range(3)]
    with torch.no_grad():
        for cache, ids in zip(caches, (rows, rows[:1], rows[1:])):
            model(ids[:, :50], **with_cache(cache), use_cache=True)
            for t in range(50, 70):
                model(ids[:, t:t + 1], **with_cache(cache), use_cache=True)
    for i in range(layers):
        value = caches[0]._layer(i)[1]
        torch.testing.assert_close(value, torch.cat([caches[1]._layer(i)[1], caches[2]._layer(i)[1]]))


def test_hyperparameters_are_checked_and_saved_state_restores_the_draws():
    from lacache_core.policies import policy_from_state

    with pytest.raises(ConfigError, match="CAM.merge_budget"):
        CAM(merge_budget=0)
    with pytest.raises(ConfigError, match="CAM.merge_mode"):
        CAM(merge_mode="mean")
    with pytest.raises(ConfigError, match="CAM.cache_size"):
        CAM(cache_size=4, start_size=4)
    g = torch.Generator().manual_seed(1)
    queries, keys, values = (torch.randn(1, 2, 60, 4, generator=g, dtype=torch.float64) for _ in range(3))
    first = CAM(cache_size=12, start_size=2, merge_budget=4, random_seed=9)
    k_cache, v_cache = policy_stream(first, queries[:, :, :30], keys[:, :, :30], values[:, :, :30])
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    restored = policy_from_state(torch.load(saved, weights_only=True))
    rest = (queries[:, :, 30:], keys[:, :, 30:], values[:, :, 30:])
    a = policy_stream(first, *rest, k_cache, v_cache)
    b = policy_stream(restored, *rest, k_cache, v_cache)
    assert restored.settings() == first.settings()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- under KV quantization
def test_a_rewritten_quantized_value_is_held_whole_until_its_token_leaves():
    g = torch.Generator().manual_seed(4)
    key, value = torch.randn(1, 1, 12, 8, generator=g), torch.randn(1, 1, 12, 8, generator=g)
    store = KIVIStore(KIVI(bits=2, group=4, residual=4), key, value)
    store.compress()  # 8 quantized, 4 whole
    plain_bytes, (_, before) = store.nbytes(), store.view()
    new = before.clone()
    new[:, :, 2] += 0.25  # a quantized token and a residual one
    new[:, :, 9] -= 0.5
    store.rewrite_values(new, (new != before).any(-1))
    _, after = store.view()
    assert torch.equal(after, new)  # exact: nothing quantized again, no other token touched
    assert store.whole_slot.tolist() == [[[2]]]
    assert store.nbytes() == plain_bytes + 8 * 4 + 4  # one value in float32, its slot as int32
    keep = torch.tensor([0, 2, 3, 5, 6, 7, 8, 9, 10, 11])  # slots 1 and 4 leave: token 2 moves to slot 1
    store.gather(keep)
    assert store.whole_slot.tolist() == [[[1]]] and torch.equal(store.view()[1], new[:, :, keep])
    store.gather(torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9]))  # token 2 leaves: nothing is held whole
    assert store.whole_slot is None and store.nbytes() < plain_bytes


def test_heads_holding_different_counts_keep_their_values_as_blocks_are_quantized():
    # head 0 holds two merged values whole, head 1 one: its unused entry must never land on a token quantized later
    g = torch.Generator().manual_seed(4)
    key, value = torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    store = KIVIStore(KIVI(bits=8, group=4, residual=4), key, value)
    store.compress()
    _, before = store.view()
    new = before.clone()
    new[:, 0, 1] += 1
    new[:, 0, 2] += 1
    new[:, 1, 1] += 1
    store.rewrite_values(new, (new != before).any(-1))
    later = torch.randn(1, 2, 4, 8, generator=g)
    for t in range(4):  # slots 8-11 become a quantized block
        store.append(later[:, :, t:t + 1], later[:, :, t:t + 1])
        store.compress()
    _, after = store.view()
    assert store.key_codes.shape[2] == 12 and store.whole_slot.tolist() == [[[1, 2], [1, -1]]]
    assert torch.equal(after[:, :, :8], new[:, :, :8])
    part = new[:, :, 8:12].reshape(1, 2, 4, 2, 4)  # 8-bit codes per token and group of 4 channels
    step = (part.amax(-1, keepdim=True) - part.amin(-1, keepdim=True)) / 255
    assert bool(((after[:, :, 8:12].reshape(1, 2, 4, 2, 4) - part).abs() <= step / 2 + 1e-6).all())


def run_stream(model, cache, until=130):
    with torch.no_grad():
        model(TOKENS[:, :90], **with_cache(cache), use_cache=True)
        for t in range(90, until):
            model(TOKENS[:, t:t + 1], **with_cache(cache), use_cache=True)


@needs_cache
def test_quantized_cam_follows_cam_not_streamingllm():
    """At 8 bits the quantized cache's next logits stay near CaM's, far from StreamingLLM's (which keeps the same
    slots unmerged): the merges survive quantization."""
    model = enable_position_shift(tiny_model("llama", "eager"))
    layers = model.config.num_hidden_layers
    caches = [CompressedCache(CAM(cache_size=40, start_size=4, merge_mode="expected"), layers, quant=KIVI(8, 8, 16)),
              CompressedCache(CAM(cache_size=40, start_size=4, merge_mode="expected"), layers, key_rotation="every_step"),
              CompressedCache(StreamingLLM(start_size=4, recent_size=36), layers, key_rotation="every_step")]
    logits = []
    for cache in caches:
        run_stream(model, cache)
        with torch.no_grad():
            logits.append(model(TOKENS[:, 130:131], **with_cache(cache), use_cache=True).logits[0, -1])
    quantized, cam, streaming = logits
    assert (quantized - cam).abs().max() < 0.02 * (cam - streaming).abs().max()


@needs_cache
@pytest.mark.parametrize("quant", [KIVI(4, 8, 16), GEAR(2, 8, 16, rank=2)], ids=["kivi4", "gear2"])
def test_quantized_cam_attends_to_what_it_holds_and_counts_the_whole_values(quant):
    model = enable_position_shift(tiny_model("llama", "eager"))
    layers = model.config.num_hidden_layers
    cam = CompressedCache(CAM(cache_size=40, start_size=4), layers, quant=quant)
    streaming = CompressedCache(StreamingLLM(start_size=4, recent_size=36), layers, quant=quant)
    for cache in (cam, streaming):
        run_stream(model, cache)
    assert torch.equal(cam.kept_positions(), streaming.kept_positions())
    whole = 0
    for i in range(layers):
        store = cam._stores[i]
        assert store.whole_slot is not None and store.whole_slot.shape[2] <= 16  # at most the merge budget per head
        whole += store.whole_slot.numel() * 4 + store.whole_value.numel() * 4
    assert cam.kv_bytes() - streaming.kv_bytes() == whole  # the same codes; the merged values held whole on top
    kv = [cam._stores[i].view() for i in range(layers)]
    with torch.no_grad():
        expected = manual_next_logits(model, int(TOKENS[0, 130]), kv)
        ours = model(TOKENS[:, 130:131], **with_cache(cam), use_cache=True).logits[0, -1]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)

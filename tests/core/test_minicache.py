"""MiniCache: adjacent layers from the middle on share one merged KV after the prompt (SLERP of the two layers'
unit directions, per-layer magnitudes, the tokens of largest key angle kept unmerged). Hand-derived merges, the
round trip, next-step logits against a from-scratch step on the restored keys and values, and the bytes held."""
import math
from dataclasses import replace

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import CompressedCache, ConfigError, KIVI, build_policy, enable_position_shift
from lacache_core import GEAR
from lacache_core.policies import METHODS, MiniCache
from lacache_core.policies.minicache import merge_layers, retained_slots, slerp_directions
from lacache_core.merged_store import MergedLayerStore
from lacache_core.storage import RowStores
from lacache_core.versions import with_cache
from references import gear_reference, kivi_reference
from tiny import manual_next_logits, rotate, tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                reason="cache objects need transformers >= 4.36")
TOKENS = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(5))


def at_angles(angles, radius=1.0):
    """``[1, 1, n, 2]``: 2-D vectors of length ``radius`` at ``angles`` from the first axis."""
    a = torch.tensor(angles, dtype=torch.float64)
    r = torch.as_tensor(radius, dtype=torch.float64)
    return (torch.stack([a.cos(), a.sin()], -1) * (r[..., None] if r.dim() else r))[None, None]


# ----------------------------------------------------------------------------- hand-derived merges
@pytest.mark.parametrize("t", [0.0, 0.3, 0.6, 1.0])
def test_slerp_of_two_unit_vectors_lies_at_t_theta_from_the_earlier_layer(t):
    # u = (1, 0), w = (cos a, sin a): sin((1-t)a)/sin a * u + sin(ta)/sin a * w has first coordinate
    # (sin a cos(ta) - cos a sin(ta) + sin(ta) cos a) / sin a = cos(ta) and second sin(ta): the unit vector at ta
    theta = torch.tensor([0.1, 0.9, 1.5, 2.5])
    previous = at_angles([0.0] * 4, radius=torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=torch.float64))
    current = at_angles(theta.tolist(), radius=torch.tensor([3.0, 4.0, 0.25, 1.0], dtype=torch.float64))
    direction, previous_norm, current_norm, angle = slerp_directions(previous, current, t)
    torch.testing.assert_close(direction, at_angles((t * theta).tolist()).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(angle[0, 0], theta, atol=1e-5, rtol=0)
    torch.testing.assert_close(previous_norm[0, 0], torch.tensor([2.0, 0.5, 1.0, 3.0]))
    torch.testing.assert_close(current_norm[0, 0], torch.tensor([3.0, 4.0, 0.25, 1.0]))


def test_slerp_is_not_the_normalised_average():
    # at 2.5 rad apart and t = 0.6 the SLERP direction is at 1.5 rad; the normalised linear blend is not
    direction, *_ = slerp_directions(at_angles([0.0]), at_angles([2.5]), 0.6)
    blend = 0.4 * at_angles([0.0]) + 0.6 * at_angles([2.5])
    blend = (blend / blend.norm(dim=-1, keepdim=True)).float()
    torch.testing.assert_close(direction, at_angles([1.5]).float(), atol=1e-6, rtol=0)
    assert (direction - blend).abs().max() > 0.05


def test_retention_keeps_the_tokens_of_largest_key_angle_and_values_follow_keys():
    # keys of the two layers 0.1, 1.2, 0.3, 2.5, 0.7 rad apart: ceil(5 * 0.4) = 2 retained, tokens 1 and 3
    # (increasing); the values differ most at tokens 0 and 2, but are retained where the keys are
    key_angles = [0.1, 1.2, 0.3, 2.5, 0.7]
    value_angles = [2.9, 0.1, 2.8, 0.2, 0.1]
    k0, k1 = at_angles([0.0] * 5), at_angles(key_angles, radius=2.0)
    v0, v1 = at_angles([1.0] * 5, radius=3.0), at_angles([1.0 + a for a in value_angles])
    assert retained_slots(torch.tensor([[key_angles]]), 0.4).tolist() == [[[1, 3]]]
    assert retained_slots(torch.tensor([[key_angles]]), 0.0).shape == (1, 1, 0)
    pair = merge_layers((k0, v0), (k1, v1), 0.6, 0.4)
    assert pair.retained.tolist() == [[[1, 3]]]
    assert torch.equal(pair.retained_keys[0], k0[:, :, [1, 3]]) and torch.equal(pair.retained_keys[1], k1[:, :, [1, 3]])
    assert torch.equal(pair.retained_values[0], v0[:, :, [1, 3]])
    assert torch.equal(pair.retained_values[1], v1[:, :, [1, 3]])
    # keys and values each get their own direction: values at 1 + 0.6 * their angle
    torch.testing.assert_close(pair.value_direction, at_angles([1.0 + 0.6 * a for a in value_angles]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(pair.key_direction, at_angles([0.6 * a for a in key_angles]), atol=1e-6, rtol=0)


def test_retention_is_per_row_and_kv_head():
    angle = torch.tensor([[[0.1, 0.9, 0.2, 0.3], [0.8, 0.1, 0.2, 0.7]],
                          [[0.5, 0.4, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]]])
    assert retained_slots(angle, 0.5).tolist() == [[[1, 3], [0, 3]], [[0, 1], [2, 3]]]


# ----------------------------------------------------------------------------- round trip
def test_round_trip_restores_retained_tokens_exactly_and_merged_ones_as_direction_times_magnitude():
    g = torch.Generator().manual_seed(0)
    k0, k1, v0, v1 = (torch.randn(2, 3, 20, 8, generator=g) for _ in range(4))
    pair = merge_layers((k0, v0), (k1, v1), 0.6, 0.1)
    stores = MergedLayerStore(pair, 0), MergedLayerStore(pair, 1)
    index = pair.retained  # [2, 3, 2]
    assert index.shape == (2, 3, 2)
    for store, key, value in zip(stores, (k0, k1), (v0, v1)):
        got_key, got_value = store.view()
        assert store.shape() == (2, 3, 20)
        for b in range(2):
            for h in range(3):
                kept = set(index[b, h].tolist())
                for s in range(20):
                    if s in kept:  # bit for bit
                        assert torch.equal(got_key[b, h, s], key[b, h, s])
                        assert torch.equal(got_value[b, h, s], value[b, h, s])
                    else:
                        torch.testing.assert_close(got_key[b, h, s], pair.key_direction[b, h, s] * key[b, h, s].norm())
                        torch.testing.assert_close(got_value[b, h, s],
                                                   pair.value_direction[b, h, s] * value[b, h, s].norm())
        torch.testing.assert_close(got_key.norm(dim=-1), key.norm(dim=-1))  # every magnitude kept
        assert not torch.allclose(got_key, key)  # the merged tokens did change
    # the two layers' merged tokens share their direction
    a, b = stores[0].view()[0], stores[1].view()[0]
    merged = torch.ones(2, 3, 20, dtype=torch.bool).scatter_(-1, index, False)
    torch.testing.assert_close((a / a.norm(dim=-1, keepdim=True))[merged], (b / b.norm(dim=-1, keepdim=True))[merged])
    # tokens appended later are each layer's own, whole
    new = torch.randn(2, 3, 1, 8, generator=g)
    stores[1].append(new, -new)
    assert stores[1].shape() == (2, 3, 21) and stores[0].shape() == (2, 3, 20)
    assert torch.equal(stores[1].view()[0][:, :, -1:], new) and torch.equal(stores[1].view()[1][:, :, -1:], -new)


def test_full_retention_is_lossless_and_t_zero_keeps_the_earlier_direction():
    g = torch.Generator().manual_seed(1)
    k0, k1, v0, v1 = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(4))
    pair = merge_layers((k0, v0), (k1, v1), 0.6, 1.0)
    for layer, (key, value) in enumerate(((k0, v0), (k1, v1))):
        got = MergedLayerStore(pair, layer).view()
        assert torch.equal(got[0], key) and torch.equal(got[1], value)
    pair = merge_layers((k0, v0), (k1, v1), 0.0, 0.0)
    torch.testing.assert_close(MergedLayerStore(pair, 0).view()[0], k0)  # the earlier layer's own direction
    restored = MergedLayerStore(pair, 1).view()[0]
    torch.testing.assert_close(restored, k0 / k0.norm(dim=-1, keepdim=True) * k1.norm(dim=-1, keepdim=True))


def test_merging_commutes_with_the_rotation_both_layers_share():
    # RoPE rotates both layers' keys of a token by the same orthogonal map: merge-then-rotate = rotate-then-merge
    g = torch.Generator().manual_seed(2)
    k0, k1, v = (torch.randn(1, 2, 30, 16, generator=g) for _ in range(3))
    pos = torch.arange(100, 130)
    plain = merge_layers((k0, v), (k1, v), 0.6, 0.2)
    turned = merge_layers((rotate(k0, pos, 10000.0, 16), v), (rotate(k1, pos, 10000.0, 16), v), 0.6, 0.2)
    assert torch.equal(plain.retained, turned.retained)
    torch.testing.assert_close(turned.key_direction, rotate(plain.key_direction, pos, 10000.0, 16), atol=1e-5, rtol=0)
    for layer in (0, 1):
        torch.testing.assert_close(turned.key_norms[layer], plain.key_norms[layer])
        restored = MergedLayerStore(plain, layer).view()[0]
        torch.testing.assert_close(MergedLayerStore(turned, layer).view()[0], rotate(restored, pos, 10000.0, 16),
                                   atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- in the cache
def reference_merge(key0, value0, key1, value1, t, ratio, held=None):
    """Both layers restored after the merge, re-derived here: per token the SLERP of the unit vectors, each
    layer's norm, the ceil(n * ratio) tokens of largest key angle put back exactly (keys and values). ``held``:
    what storing does to the two directions (quantization; then re-normalised, as the restore does)."""
    def slerp(x, y):
        u, w = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
        a = torch.acos((u * w).sum(-1, keepdim=True).clamp(-1 + 1e-6, 1 - 1e-6))
        m = (torch.sin((1 - t) * a) * u + torch.sin(t * a) * w) / torch.sin(a)
        return m / m.norm(dim=-1, keepdim=True), a[..., 0]

    (kd, angle), (vd, _) = slerp(key0, key1), slerp(value0, value1)
    if held is not None:
        kd, vd = (x / x.norm(dim=-1, keepdim=True) for x in held(kd, vd))
    r = math.ceil(key0.shape[2] * ratio)
    kept = angle.argsort(-1, descending=True)[..., :r]
    out = []
    for key, value in ((key0, value0), (key1, value1)):
        k, v = kd * key.norm(dim=-1, keepdim=True), vd * value.norm(dim=-1, keepdim=True)
        for b, h in torch.cartesian_prod(torch.arange(key.shape[0]), torch.arange(key.shape[1])).tolist():
            k[b, h, kept[b, h]], v[b, h, kept[b, h]] = key[b, h, kept[b, h]], value[b, h, kept[b, h]]
        out.append((k, v))
    return out


@pytest.mark.parametrize("key_rotation", ["every_step", "incremental"])
def test_next_step_matches_a_from_scratch_step_on_the_restored_keys_and_values(key_rotation):
    model = enable_position_shift(tiny_model("llama", "eager"))
    L = model.config.num_hidden_layers
    settings = dict(interpolation=0.6, retention_ratio=0.1, merge_start=1)  # pairs (1, 2) and (3, 4); 0 and 5 whole
    mini = CompressedCache(build_policy("minicache", **settings), L, key_rotation=key_rotation)
    full = CompressedCache(build_policy("full"), L, key_rotation=key_rotation)
    with torch.no_grad():
        model(TOKENS[:, :120], **with_cache(mini), use_cache=True)
        model(TOKENS[:, :120], **with_cache(full), use_cache=True)
        for t in range(120, 124):  # decoded tokens are each layer's own
            model(TOKENS[:, t:t + 1], **with_cache(mini), use_cache=True)
            model(TOKENS[:, t:t + 1], **with_cache(full), use_cache=True)
        assert [type(s).__name__ for s in mini._stores] == ["NoneType"] + ["MergedLayerStore"] * 4 + ["NoneType"]
        kv = [full._layer(i) for i in range(L)]
        # the prompt's pass is the same in both caches: its 120 tokens merged from the full cache's; the 4 decoded
        # tokens (which the merged layers before them changed) are the cache's own, whole
        restored = [mini._layer(i) for i in range(L)]
        for first in (1, 3):
            (k0, v0), (k1, v1) = (tuple(t[:, :, :120] for t in kv[i]) for i in (first, first + 1))
            for i, (k, v) in enumerate(reference_merge(k0, v0, k1, v1, 0.6, 0.1)):
                tail = mini._stores[first + i].pair.tails[i].view()
                restored[first + i] = (torch.cat([k, tail[0]], 2), torch.cat([v, tail[1]], 2))
        assert torch.equal(restored[0][0], kv[0][0])  # before the first merged layer nothing differs
        for i in range(L):
            torch.testing.assert_close(mini._layer(i)[0], restored[i][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mini._layer(i)[1], restored[i][1], atol=1e-5, rtol=1e-5)
        rotated = key_rotation == "incremental"
        positions = full.kept_positions()
        expected = manual_next_logits(model, int(TOKENS[0, 124]), restored, query_pos=124, key_positions=positions,
                                      rotated=rotated)
        unmerged = manual_next_logits(model, int(TOKENS[0, 124]), kv, query_pos=124, key_positions=positions,
                                      rotated=rotated)
        ours = model(TOKENS[:, 124:125], **with_cache(mini), use_cache=True).logits[0, -1]
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    assert (ours - unmerged).abs().max() > 1e-3  # the merge changes the answer: the test can tell


def test_rotated_and_unrotated_storage_give_the_same_logits():
    model = enable_position_shift(tiny_model("llama", "eager"))
    out = []
    for key_rotation in ("every_step", "incremental"):
        cache = CompressedCache(build_policy("minicache", retention_ratio=0.1), 6, key_rotation=key_rotation)
        with torch.no_grad():
            model(TOKENS[:, :100], **with_cache(cache), use_cache=True)
            out.append(torch.stack([model(TOKENS[:, t:t + 1], **with_cache(cache), use_cache=True).logits[0, -1]
                                    for t in range(100, 105)]))
    torch.testing.assert_close(out[0], out[1], atol=2e-5, rtol=1e-4)


def pair_bytes(n, r, kv_heads, d, element=4, index=8):
    """What one merged pair holds: two directions, four magnitudes, the retained slots, four retained tensors."""
    return (2 * n * d + 4 * n) * kv_heads * element + r * kv_heads * index + 4 * r * kv_heads * d * element


def test_kv_bytes_is_what_the_pair_stores_hold_and_less_than_the_full_cache():
    model = enable_position_shift(tiny_model("llama", "eager"))
    cfg = model.config
    L, kvh, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    mini = CompressedCache(build_policy("minicache"), L)  # default: merge_start 3, pair (3, 4), t 0.6, 5%
    full = CompressedCache(build_policy("full"), L)
    with torch.no_grad():
        model(TOKENS[:, :120], **with_cache(mini), use_cache=True)
        model(TOKENS[:, :120], **with_cache(full), use_cache=True)
        slot = 2 * kvh * d * 4  # a token's key and value in one layer, float32
        r = math.ceil(120 * 0.05)
        assert r == 6 and mini.policy.merged_pairs(L) == [(3, 4)]
        assert full.kv_bytes() == L * 120 * slot
        assert mini.kv_bytes() == (L - 2) * 120 * slot + pair_bytes(120, r, kvh, d)
        for t in range(120, 130):  # 10 decoded tokens, whole, in every layer
            model(TOKENS[:, t:t + 1], **with_cache(mini), use_cache=True)
            model(TOKENS[:, t:t + 1], **with_cache(full), use_cache=True)
    assert mini.kv_bytes() == (L - 2) * 130 * slot + pair_bytes(120, r, kvh, d) + 2 * 10 * slot
    assert mini.kv_bytes() < full.kv_bytes()
    # the shared tensors are counted once over the pair: half in each layer
    shared = mini._stores[3].pair.shared_bytes()
    assert mini._stores[3].nbytes() - mini._stores[3].pair.own_bytes(0) == shared // 2
    assert mini._stores[3].nbytes() + mini._stores[4].nbytes() == pair_bytes(120, r, kvh, d) + 2 * 10 * slot
    assert [mini.get_seq_length(i) for i in range(L)] == [130] * L


def test_generate_merges_after_the_prompt_and_keeps_every_token():
    model = enable_position_shift(tiny_model("qwen2", "sdpa"))
    cache = CompressedCache(build_policy("minicache", merge_start=0), 6)  # pairs (0, 1), (2, 3), (4, 5)
    full = CompressedCache(build_policy("full"), 6)
    out = model.generate(TOKENS[:, :80], **with_cache(cache), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    model.generate(TOKENS[:, :80], **with_cache(full), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert out.shape == (1, 100)
    assert all(isinstance(s, MergedLayerStore) for s in cache._stores)
    assert [cache.get_seq_length(i) for i in range(6)] == [99] * 6
    assert cache._stores[0].pair is cache._stores[1].pair and cache._stores[0].pair.merged_slots() == 80
    slot = 2 * 2 * 16 * 4  # a token's key and value in one layer (2 KV heads of 16 channels, float32)
    assert full.kv_bytes() == 6 * 99 * slot
    assert cache.kv_bytes() == 3 * pair_bytes(80, 4, 2, 16) + 6 * 19 * slot < 0.7 * full.kv_bytes()
    assert torch.equal(cache.kept_positions(), torch.arange(99).expand(6, 99))


def test_a_left_padded_batch_merges_each_row_over_its_own_tokens():
    if Version(transformers.__version__) < Version("4.48"):
        pytest.skip("padded batches need the attention-interface path (transformers >= 4.48)")
    model = enable_position_shift(tiny_model("llama", "sdpa"))
    g = torch.Generator().manual_seed(9)
    rows = [torch.randperm(127, generator=g)[:n] + 1 for n in (50, 40)]  # no pad token (0) among them
    prompts, mask = torch.zeros(2, 50, dtype=torch.long), torch.zeros(2, 50, dtype=torch.long)
    for j, row in enumerate(rows):
        prompts[j, 50 - len(row):], mask[j, 50 - len(row):] = row, 1
    cache = CompressedCache(build_policy("minicache", retention_ratio=0.1), 6)
    batch = model.generate(prompts, attention_mask=mask, **with_cache(cache), max_new_tokens=8, min_new_tokens=8,
                           do_sample=False, pad_token_id=0)
    assert isinstance(cache._stores[3], RowStores)
    assert [s.pair.retained.shape[-1] for s in cache._stores[3].stores] == [5, 4]  # ceil(50 / 10), ceil(40 / 10)
    for j, row in enumerate(rows):
        alone = CompressedCache(build_policy("minicache", retention_ratio=0.1), 6)
        single = model.generate(row[None], **with_cache(alone), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                pad_token_id=0)
        assert torch.equal(batch[j, 50:], single[0, len(row):])
        assert cache._stores[3].stores[j].nbytes() == alone._stores[3].nbytes()


# ----------------------------------------------------------------------------- settings
def test_defaults_registry_and_one_line_errors():
    policy = build_policy("minicache")
    assert METHODS["minicache"] is MiniCache and policy.prefill_only and not policy.observes
    assert (policy.interpolation, policy.retention_ratio, policy.merge_start) == (0.6, 0.05, None)
    assert policy.first_merged(32) == 16 and policy.merged_pairs(7) == [(3, 4), (5, 6)]
    for bad, setting in ((dict(interpolation=1.5), "MiniCache.interpolation"),
                         (dict(retention_ratio=-0.1), "MiniCache.retention_ratio"), (dict(merge_start=-1), "MiniCache.merge_start")):
        with pytest.raises(ConfigError, match=setting):
            build_policy("minicache", **bad)
    with pytest.raises(ConfigError, match="MiniCache.merge_start 5 leaves no pair of layers to merge in a 6-layer model"):
        CompressedCache(build_policy("minicache", merge_start=5), 6)
    CompressedCache(build_policy("minicache", merge_start=4), 6)  # the last pair
    with pytest.raises(ConfigError, match="CompressedCache"):
        build_policy("minicache")([(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))] * 2)


def test_prompt_harness_runs_minicache_without_a_budget_in_its_name(tiny_dir, tmp_path):  # noqa: F811
    # MiniCache keeps every token: the harness's --budget means nothing to it and stays out of the folder's name
    from runs import rows_of
    from runs import run_niah

    assert run_niah(tiny_dir, tmp_path / "out", "--method", "minicache", "--merge_start", "2") == 0
    folder = next(p for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert folder.name.split("__")[-1].rsplit("-", 1)[0] == "minicache_merge_start-2"
    assert len(rows_of(folder / "results.csv")) == 12


# ----------------------------------------------------------------------------- under KV quantization
@pytest.mark.parametrize("quant", [KIVI(4, 8, 16), KIVI(2, 8, 16, "post_rope"), GEAR(2, 8, 16, rank=2)],
                         ids=["kivi4", "kivi2_post_rope", "gear2"])
def test_quantized_pairs_hold_the_merge_of_whole_layers_quantized_once(quant):
    # the pair's earlier layer waits whole for the merge; the directions are then quantized (every whole block),
    # magnitudes and retained tokens kept whole; unmerged layers are KIVI's; decoded tokens fill each layer's tail
    model = enable_position_shift(tiny_model("llama", "eager"))
    L = model.config.num_hidden_layers
    rotated = quant.key_order == "post_rope"
    reference = gear_reference if isinstance(quant, GEAR) else kivi_reference
    settings = dict(interpolation=0.6, retention_ratio=0.1, merge_start=1)  # pairs (1, 2) and (3, 4)
    mini = CompressedCache(build_policy("minicache", **settings), L, quant=quant)
    plain = CompressedCache(build_policy("minicache", **settings), L)
    full = CompressedCache(build_policy("full"), L, key_rotation="incremental" if rotated else "every_step")
    full_quant = CompressedCache(build_policy("full"), L, quant=quant)
    with torch.no_grad():
        for cache in (mini, plain, full, full_quant):
            model(TOKENS[:, :120], **with_cache(cache), use_cache=True)
    kv = [full._layer(i) for i in range(L)]
    expected = [reference(*kv[i], quant) for i in range(L)]
    for first in (1, 3):
        expected[first:first + 2] = reference_merge(*kv[first], *kv[first + 1], 0.6, 0.1,
                                                    held=lambda k, v: reference(k, v, replace(quant, residual=0)))
    for i in range(L):
        torch.testing.assert_close(mini._layer(i)[0], expected[i][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mini._layer(i)[1], expected[i][1], atol=1e-5, rtol=1e-5)
    assert mini._stores[1].pair.directions.key_codes.shape[2] == 120  # 15 blocks: no direction left whole
    assert mini.kv_bytes() < min(plain.kv_bytes(), full_quant.kv_bytes())
    with torch.no_grad():
        for t in range(120, 140):  # 20 decoded tokens: each tail quantizes its oldest block of 8
            model(TOKENS[:, t:t + 1], **with_cache(mini), use_cache=True)
        assert mini._stores[2].pair.tails[1].key_codes.shape[2] == 8
        layers = [mini._layer(i) for i in range(L)]
        want = manual_next_logits(model, int(TOKENS[0, 140]), layers, rotated=rotated)
        got = model(TOKENS[:, 140:141], **with_cache(mini), use_cache=True).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

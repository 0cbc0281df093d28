"""KVCache-Factory's ``--merge pivot|weighted`` (Zefan-Cai/KVCache-Factory @ c97f9d7, ``pyramidkv/pyramidkv_utils.py``
``merge_kv``): hand-worked examples, a loop re-derivation on a real prompt, its methods and its refusals."""
import math

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import KIVI, CompressedCache, ConfigError, build_policy, enable_position_shift, make_cache
from lacache_core.policies.merging import merge_evicted
from lacache_core.versions import with_cache
from tiny import tiny_model

needs_cache = pytest.mark.skipif(Version(transformers.__version__) < Version("4.36"),
                                 reason="cache objects need transformers >= 4.36")
V = torch.tensor([[1.0, 1.0], [3.0, 5.0], [4.0, 0.0], [2.0, 2.0]])


@pytest.mark.parametrize("k2, mode, key0, value0, key3, value3", [
    # token 1 joins token 0 (cos .8 against .6), token 2 joins token 3 (cos 1 against 0)
    ((0.0, 2.0), "pivot", (0.95, 0.15), (1.5, 2.0), (0.0, 1.25), (2.5, 1.5)),
    ((0.0, 2.0), "weighted", (1.72 / 1.9, 0.54 / 1.9), (3.7 / 1.9, 5.5 / 1.9), (0.0, 1.5), (3.0, 1.0)),
    # both join token 0 (cos .8 and .6); token 3 receives nothing and stays
    ((0.6, -0.8), "pivot", (0.9, -1 / 30), (11 / 6, 1.5), (0.0, 1.0), (2.0, 2.0)),
    ((0.6, -0.8), "weighted", (2.2 / 2.7, -0.1 / 2.7), (6.9 / 2.7, 5.5 / 2.7), (0.0, 1.0), (2.0, 2.0)),
])
def test_worked_examples(k2, mode, key0, value0, key3, value3):
    # keys (1, 0), (.8, .6), k2, (0, 1); tokens 0 and 3 kept (the window), 1 and 2 evicted. pivot: each evicted
    # token adds (X + R) / 2 and the sum is divided by 1 + count; weighted: w = (cos + 1) / 2 and R keeps weight 1
    key = torch.tensor([[1.0, 0.0], [0.8, 0.6], list(k2), [0.0, 1.0]])[None, None]
    merged_key, merged_value = merge_evicted(key, V[None, None], torch.tensor([0, 3]), mode)
    torch.testing.assert_close(merged_key[0, 0, [0, 3]], torch.tensor([key0, key3]))
    torch.testing.assert_close(merged_value[0, 0, [0, 3]], torch.tensor([value0, value3]))


def reference_merge(key, value, keep, mode):
    """merge_kv written out per head and evicted token."""
    key, value = key.clone().double(), value.clone().double()
    out_k, out_v = key.clone(), value.clone()
    for h in range(key.shape[1]):
        kept = keep[h].tolist() if keep.dim() == 2 else keep.tolist()
        dropped = [i for i in range(key.shape[2]) if i not in kept]
        joins = {j: [] for j in kept}
        for d in dropped:
            cos = [float(key[0, h, d] @ key[0, h, j]) / (max(key[0, h, d].norm(), 1e-6) * max(key[0, h, j].norm(), 1e-6))
                   for j in kept]
            best = max(range(len(kept)), key=lambda i: cos[i])
            joins[kept[best]].append((d, 1.0 if mode == "pivot" else max((cos[best] + 1) / 2, 1e-6)))
        for j, members in joins.items():
            for states, out in ((key, out_k), (value, out_v)):
                if mode == "pivot":
                    total = states[0, h, j] + sum((states[0, h, d] + states[0, h, j]) / 2 for d, _ in members)
                    out[0, h, j] = total / (1 + len(members))
                else:
                    total = states[0, h, j] + sum(w * states[0, h, d] for d, w in members)
                    out[0, h, j] = total / (1 + sum(w for _, w in members))
    return out_k, out_v


@needs_cache
@pytest.mark.parametrize("mode", ["pivot", "weighted"])
@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "h2o"])
def test_the_cache_holds_the_merged_prompt(method, mode):
    # the prompt's keys and values (rotated keys, as the full cache holds them) merged by the reference's rule along
    # the method's own choice are what the merging cache keeps
    model = enable_position_shift(tiny_model("llama", "eager", layers=2))
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(1))
    settings = dict(cache_size=20, window_size=4, start_size=2, beta=2)
    full = make_cache("full", model, key_rotation="incremental")
    plain = make_cache(method, model, **settings)
    merged = make_cache(method, model, merge=mode, **settings)
    with torch.no_grad():
        for cache in (full, plain, merged):
            model(ids, **with_cache(cache), use_cache=True)
    for layer in range(2):
        kept = plain.kept_positions()[layer]
        assert torch.equal(merged.kept_positions()[layer], kept)
        expected_k, expected_v = reference_merge(*full._layer(layer), kept, mode)
        keep = kept
        index = keep[None, :, :, None] if keep.dim() == 2 else keep[None, None, :, None]
        index = index.expand(1, 2, keep.shape[-1], 16)
        ours_k, ours_v = merged._layer(layer)
        torch.testing.assert_close(ours_k.double(), expected_k.gather(2, index), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_v.double(), expected_v.gather(2, index), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours_v, plain._layer(layer)[1])  # merging changed the kept values


@needs_cache
@pytest.mark.parametrize("mode", ["pivot", "weighted"])
@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "h2o", "streamingllm"])
def test_merging_methods_generate_within_budget_and_differ(method, mode):
    model = enable_position_shift(tiny_model("qwen2", "sdpa"))
    prompt = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(3))
    runs = {}
    for merge in (None, mode):
        cache = make_cache(method, model, cache_size=30, recent_size=26, window_size=4, beta=2, merge=merge)
        runs[merge] = model.generate(prompt, **with_cache(cache), max_new_tokens=30, min_new_tokens=30, do_sample=False)
        budget = cache.policy.max_cache_len(6) + (29 if cache.policy.prefill_only else 0)  # prefill-time: then grows
        assert cache.get_seq_length() <= budget
    assert runs[mode].shape[1] == 90 and not torch.equal(runs[mode], runs[None])


@needs_cache
def test_merge_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="AdaKV.merge is not available for adakv"):
        build_policy("adakv", merge="pivot")
    with pytest.raises(ConfigError, match="ThinK.merge is not available for think"):
        build_policy("think", merge="weighted")
    with pytest.raises(ConfigError, match="merge must be one of"):
        build_policy("snapkv", merge="average")
    policy = build_policy("h2o", cache_size=40, merge="pivot")
    with pytest.raises(ConfigError, match="key_rotation every_step cannot be used with H2O.merge pivot"):
        CompressedCache(policy, 2, key_rotation="every_step")
    with pytest.raises(ConfigError, match="quant kivi cannot be used with H2O.merge pivot"):
        CompressedCache(policy, 2, quant=KIVI())
    assert "merge" not in build_policy("snapkv").settings()  # a setting added later: old results keep their hash

"""Position-shift patch: exact without eviction, equal to a from-scratch step after eviction."""
import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import H2O, LSHE, TOVA, LaCache, StreamingLLM, enable_position_shift, make_cache
from lacache_core.versions import with_cache
from tiny import ATTN, FAMILIES, manual_next_logits, tiny_model

MODERN = Version(transformers.__version__) >= Version("4.36")
pytestmark = pytest.mark.skipif(not MODERN, reason="Cache objects need transformers >= 4.36 (see test_legacy_tuple.py)")

TOKENS = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(1))


def step_logits(model, cache, tokens, positions=None):
    out = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            kw = {} if positions is None else {"position_ids": torch.tensor([[positions[t]]])}
            res = model(tokens[:, t:t + 1], **with_cache(cache), use_cache=True, **kw)
            cache = res.past_key_values
            out.append(res.logits[0, -1])
    return torch.stack(out), cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("method", ["lacache", "streamingllm"])
def test_no_eviction_matches_unpatched(family, attn, method):
    model = tiny_model(family, attn)
    ref, _ = step_logits(model, transformers.DynamicCache(), TOKENS)
    enable_position_shift(model)
    cache = make_cache(method, model, cache_size=1000, recent_size=996, span=2)
    ours, cache = step_logits(model, cache, TOKENS)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    # a patched model with an ordinary cache is untouched
    again, _ = step_logits(model, transformers.DynamicCache(), TOKENS)
    torch.testing.assert_close(again, ref, atol=0, rtol=0)


def model_rotation(model):
    return next(m._lacache_rotation for m in model.modules() if hasattr(m, "_lacache_rotation"))


def cached_unrotated(cache):
    return [cache._layer(i) for i in range(cache.num_layers)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("policy", [LaCache(cache_size=48, span=2, overlap=0), LaCache(cache_size=60, span=3, overlap=1),
                                    StreamingLLM(start_size=4, recent_size=40), H2O(cache_size=44), TOVA(cache_size=44),
                                    LSHE(cache_size=44, recent_window=8),
                                    LaCache(cache_size=60, span=3, overlap=1, ladder_layout="paper")],
                         ids=["la-s2o0", "la-s3o1", "sllm", "h2o", "tova", "lshe", "la-paper"])
@pytest.mark.parametrize("key_rotation", ["every_step", "incremental"])
def test_after_eviction_matches_from_scratch_step(family, attn, policy, key_rotation):
    import copy

    from lacache_core import CompressedCache

    model = enable_position_shift(tiny_model(family, attn))
    cache = CompressedCache(copy.deepcopy(policy), model.config.num_hidden_layers, key_rotation=key_rotation)
    _, cache = step_logits(model, cache, TOKENS[:, :150])
    # the from-scratch step needs un-rotated keys: an every-step cache on the same stream stores them
    unrotated = cache
    if key_rotation != "every_step":
        twin = CompressedCache(copy.deepcopy(policy), model.config.num_hidden_layers, key_rotation="every_step")
        _, unrotated = step_logits(model, twin, TOKENS[:, :150])
    kept = cache.kept_positions()
    assert kept.shape[1] < 150, "the policy must have evicted"
    if cache.policy.position_mode == "slot":
        expected = manual_next_logits(model, int(TOKENS[0, 150]), cached_unrotated(unrotated))
    else:  # kept keys at their original positions, the query at the next token's (150)
        expected = manual_next_logits(model, int(TOKENS[0, 150]), cached_unrotated(unrotated), query_pos=150,
                                      key_positions=kept)
    ours, _ = step_logits(model, cache, TOKENS[:, 150:151])
    torch.testing.assert_close(ours[0], expected, atol=2e-5, rtol=1e-4)


def test_cached_keys_are_unrotated_and_follow_kept_positions():
    """Keys of a kept token are identical to the un-rotated keys the full run computed for it."""
    model = enable_position_shift(tiny_model("llama", "eager"))
    full = make_cache("lacache", model, cache_size=1000, span=2, key_rotation="every_step")
    _, full = step_logits(model, full, TOKENS[:, :120])
    small = make_cache("lacache", model, cache_size=48, span=2, key_rotation="every_step")
    _, small = step_logits(model, small, TOKENS[:, :120])
    for i in range(model.config.num_hidden_layers):
        pos = small.kept_positions()[i]
        k_small, v_small = small._layer(i)
        k_full, v_full = full._layer(i)
        # the first layer sees identical inputs; deeper layers differ because eviction changed their inputs
        if i == 0:
            torch.testing.assert_close(k_small, k_full[:, :, pos], atol=1e-6, rtol=0)
            torch.testing.assert_close(v_small, v_full[:, :, pos], atol=1e-6, rtol=0)


def test_query_position_from_caller_when_asked():
    model = enable_position_shift(tiny_model("llama", "eager"))
    cache = make_cache("lacache", model, query_at_slot=False, cache_size=48, span=2, key_rotation="every_step")
    _, cache = step_logits(model, cache, TOKENS[:, :100], positions=list(range(100)))
    expected = manual_next_logits(model, int(TOKENS[0, 100]), cached_unrotated(cache), query_pos=120)
    ours, _ = step_logits(model, cache, TOKENS[:, 100:101], positions=[120])
    torch.testing.assert_close(ours[0], expected, atol=2e-5, rtol=1e-4)


def test_unpatched_model_with_compressed_cache_fails_loudly():
    model = tiny_model("llama", "eager")
    cache = make_cache("lacache", model, cache_size=48, span=2)
    with pytest.raises(RuntimeError, match="enable_position_shift"):
        step_logits(model, cache, TOKENS[:, :4])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lacache", "streamingllm"])
def test_generate_with_cache(family, method):
    model = tiny_model(family, "sdpa")
    prompt = TOKENS[:, :20]
    ref = model.generate(prompt, max_new_tokens=30, do_sample=False, min_new_tokens=30)
    enable_position_shift(model)
    big = make_cache(method, model, cache_size=1000, recent_size=996, span=2)
    same = model.generate(prompt, **with_cache(big), max_new_tokens=30, do_sample=False, min_new_tokens=30)
    assert torch.equal(same, ref), "without eviction generate must be unchanged"

    small = make_cache(method, model, cache_size=40, recent_size=36, span=2)
    out = model.generate(prompt, **with_cache(small), max_new_tokens=200, do_sample=False, min_new_tokens=200)
    assert out.shape[1] == 220
    assert small.get_seq_length() <= small.policy.max_cache_len(model.config.num_hidden_layers)
    assert small.kept_positions()[:, -1].tolist() == [218] * model.config.num_hidden_layers


def test_fast_rotation_is_bitwise_the_models_own_rope():
    """The rotate-half shortcut is taken only where it gives the model's own function's numbers exactly."""
    from lacache_core.rope import Rotation

    model = enable_position_shift(tiny_model("llama", "sdpa"))
    fast = model.get_decoder().layers[0].self_attn._lacache_rotation
    slow = Rotation(fast.table.rotary_fn, fast.apply_fn)
    slow._fast = False  # always the model's apply_rotary_pos_emb
    x = torch.randn(2, 2, 50, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast.from_slot(x, 7), slow.from_slot(x, 7)) and fast._fast
    pos = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(1))
    assert torch.equal(fast.at(x, pos, per_head=True), slow.at(x, pos, per_head=True))


@pytest.mark.parametrize("method,settings", [("h2o", dict(cache_size=44)), ("tova", dict(cache_size=44))])
def test_incremental_rotation_is_exact_for_original_positions(method, settings):
    """Keys that never move: rotating each once when stored gives the every-step logits bit for bit."""
    model = enable_position_shift(tiny_model("llama", "eager"))
    every = make_cache(method, model, key_rotation="every_step", **settings)
    ref, _ = step_logits(model, every, TOKENS)
    once = make_cache(method, model, key_rotation="incremental", **settings)
    ours, once = step_logits(model, once, TOKENS)
    assert once.kept_positions().shape[-1] < TOKENS.shape[1]
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_incremental_slot_keys_equal_every_step_rotation_after_many_compactions():
    """Stored LaCache keys, shifted at each compaction, equal the un-rotated keys rotated to their slots."""
    model = enable_position_shift(tiny_model("llama", "eager"))
    tokens = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(2))
    every = make_cache("lacache", model, cache_size=40, span=2, key_rotation="every_step")
    ref, every = step_logits(model, every, tokens)
    inc = make_cache("lacache", model, cache_size=40, span=2, key_rotation="incremental")
    ours, inc = step_logits(model, inc, tokens)
    assert inc.policy._cursor > 0 and torch.equal(inc.kept_positions(), every.kept_positions())
    rotation = model_rotation(model)
    for i in range(model.config.num_hidden_layers):
        torch.testing.assert_close(inc._layer(i)[0], rotation.from_slot(every._layer(i)[0], 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_auto_key_rotation_choice():
    model = enable_position_shift(tiny_model("llama", "eager"))
    rotation = model_rotation(model)
    for method, dtype, expected in [("lacache", torch.float32, True), ("lacache", torch.bfloat16, False),
                                    ("streamingllm", torch.float16, False), ("h2o", torch.bfloat16, True)]:
        cache = make_cache(method, model, cache_size=44, span=2)
        assert cache.stores_rotated(rotation, torch.zeros(1, dtype=dtype)) is expected, (method, dtype)
    assert make_cache("lacache", model, span=2, key_rotation="every_step").stores_rotated(
        rotation, torch.zeros(1)) is False


def test_key_rotation_flag_is_checked():
    from lacache_core import ConfigError

    with pytest.raises(ConfigError, match="make_cache.key_rotation"):
        make_cache("lacache", tiny_model("llama", "eager"), span=2, key_rotation="sometimes")

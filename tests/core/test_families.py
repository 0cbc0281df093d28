"""Every method on every RoPE decoder family, through the public extension points (transformers >= 4.48).

Two checks per family and method: with a budget larger than the text, logits equal the unpatched
model's; with eviction, ``generate()`` stays within budget. A model without RoPE is refused.
"""
import copy

import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import METHODS, build_policy, enable_position_shift, make_cache
from lacache_core.cache import CompressedCache
from lacache_core.versions import with_cache
from tiny import fill_and_generate, method_files

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("4.48"),
                                reason="the extension-point integration needs transformers >= 4.48")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "use_sliding_window": False}),  # q/k norms
    "phi3": ("Phi3Config", {}),  # fused qkv projection
    "olmo2": ("Olmo2Config", {}),  # q/k norms over all heads
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.25}),  # rotary on 4 of 16 channels
}
BIG = dict(cache_size=1000, recent_size=996, span=2, window_size=8, recent_window=8, pruning_ratio=0.0,
           retention_ratio=1.0, head_compression_ratio=0.0)  # nothing evicted, pruned or merged (MiniCache keeps every token unmerged)
SMALL = dict(cache_size=40, recent_size=36, span=2, window_size=8, recent_window=8, beta=2, chunk_length=4, lag_size=16)  # ChunkKV: whole chunks fill the budget
TOKENS = torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(3))


def family_model(family, attn="sdpa"):
    name, extra = FAMILIES[family]
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"{family} is not in transformers {transformers.__version__}")
    torch.manual_seed(0)
    config = cls(**COMMON, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    try:
        enable_position_shift(copy.deepcopy(model))
    except ValueError as err:  # e.g. StableLM before its attention used the registry
        assert "AttentionInterface" in str(err)
        pytest.skip(f"{family} in transformers {transformers.__version__}: {err}")
    return model


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_eviction_equals_unpatched(family, method):
    model = family_model(family)
    with torch.no_grad():
        reference = model(TOKENS[:, :60]).logits[0]
        enable_position_shift(model)
        cache = make_cache(method, model, **BIG, **method_files(model.config))
        steps = [model(TOKENS[:, :40], use_cache=True, **with_cache(cache)).logits[0]]
        steps += [model(TOKENS[:, t:t + 1], use_cache=True, **with_cache(cache)).logits[0] for t in range(40, 60)]
    torch.testing.assert_close(torch.cat(steps), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m != "full"))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_within_budget(family, method):
    model = enable_position_shift(family_model(family))
    layers = model.config.num_hidden_layers
    policy = build_policy(method, **SMALL, **method_files(model.config))
    cache = CompressedCache(policy, layers)
    out = fill_and_generate(model, TOKENS[:, :60], cache, 40)
    assert out.shape[1] == 100
    lengths = [cache.get_seq_length(i) for i in range(layers)]
    if policy.ragged:  # heads of their own lengths, then each grows by 39
        expected = [min(b, 60) + 39 for b in policy.layer_budgets(layers, 60)]
        for i, b in enumerate(expected):
            heads = cache.head_lengths(i)  # None where every head holds the same (a DuoAttention layer)
            heads = torch.full((model.config.num_key_value_heads,), lengths[i]) if heads is None else heads
            assert lengths[i] == int(heads.max())
            if method == "adakv":  # a layer's heads share its budget, up to rounding
                assert abs(int(heads.sum()) - len(heads) * b) <= len(heads)
            elif method == "duo_attention":  # streaming heads their sinks and window, retrieval heads the prompt
                assert heads.tolist() == [h + 39 for h in policy.head_budgets(i, 60)]
            elif method == "kvzip":  # the layers and heads share the model's budget: checked below
                continue
            else:  # HeadKV: each head its cap from the scores (all of the prompt at most), plus the window
                sw = policy.start_size + policy.window_size
                assert heads.tolist() == [min(c + sw, 60) + 39 for c in policy._caps[i].tolist()]
        if method == "kvzip":  # every (layer, KV head) keeps cache_size prompt tokens on average, then grows by 39
            kvh = model.config.num_key_value_heads
            held = sum(int(cache.head_lengths(i).sum()) for i in range(layers))
            assert held == layers * kvh * (min(policy.cache_size, 60) + 39)
    elif policy.prefill_only:  # compressed once after the prompt, then grows by the 39 tokens fed back
        assert lengths == [min(b, 60) + 39 for b in policy.layer_budgets(layers, 60)]
    else:
        assert max(lengths) <= policy.max_cache_len(layers)
        newest = [layer[..., -1].unique().tolist() for layer in cache.kept_positions()]
        assert newest == [[98]] * layers or method == "tova"


def test_model_without_rope_is_refused():
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="RoPE"):
        enable_position_shift(model)

"""transformers < 4.36: tuple caches, compacted by the policy as the official legacy harness does."""
import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import LaCache, StreamingLLM, enable_position_shift
from lacache_core.versions import with_cache
from tiny import manual_next_logits, tiny_model

pytestmark = pytest.mark.skipif(Version(transformers.__version__) >= Version("4.36"),
                                reason="tuple caches are the legacy (< 4.36) path")
TOKENS = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(1))


def run(model, tokens, policy=None, past=None):
    logits = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            res = model(tokens[:, t:t + 1], **with_cache(past), use_cache=True)
            past = res.past_key_values
            if policy is not None:
                past = policy(past)
            logits.append(res.logits[0, -1])
    return torch.stack(logits), past


def test_no_eviction_matches_unpatched():
    model = tiny_model("llama", "eager")
    ref, _ = run(model, TOKENS)
    enable_position_shift(model)
    ours, _ = run(model, TOKENS, LaCache(cache_size=1000, span=2))
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", [LaCache(cache_size=48, span=2), LaCache(cache_size=60, span=3, overlap=1),
                                    StreamingLLM(start_size=4, recent_size=40)], ids=["la-s2o0", "la-s3o1", "sllm"])
def test_after_eviction_matches_from_scratch_step(policy):
    model = enable_position_shift(tiny_model("llama", "eager"))
    _, past = run(model, TOKENS[:, :150], policy)
    assert past[0][0].shape[2] < 150
    expected = manual_next_logits(model, int(TOKENS[0, 150]), past)
    ours, _ = run(model, TOKENS[:, 150:151], past=past)
    torch.testing.assert_close(ours[0], expected, atol=2e-5, rtol=1e-4)


def test_scoring_methods_need_cache_objects():
    from lacache_core import H2O, ConfigError
    from harness.streaming import stream_perplexity

    model = tiny_model("llama", "eager")
    with pytest.raises(ConfigError, match="--method h2o"):
        stream_perplexity(model, None, [], H2O(cache_size=48))

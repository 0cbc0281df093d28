"""A slot policy's keys stored rotated sit in a per-layer frame that moves with the newest run of keys
(lacache_core.step.placement): only the older kept keys are rotated at a compaction, and nothing changes what
attention computes."""
import pytest
import torch
import transformers
from packaging.version import Version

from lacache_core import CachePolicy, StreamingLLM, enable_position_shift, make_cache
from lacache_core.policies.base import kept_runs
from lacache_core.step import placement
from lacache_core.versions import with_cache
from tiny import tiny_model

MODERN = Version(transformers.__version__) >= Version("4.36")
needs_cache_objects = pytest.mark.skipif(not MODERN, reason="Cache objects need transformers >= 4.36")

TOKENS = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(3))


def stream(model, cache, tokens, after_step=None):
    logits = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits.append(model(tokens[:, t:t + 1], use_cache=True, **with_cache(cache)).logits[0, -1])
            if after_step is not None:
                after_step(t, cache)
    return torch.stack(logits)


def test_newest_runs_by_hand():
    plan = torch.tensor([[0, 1, 5, 6, 7], [0, 2, 3, 6, 7], [0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    assert kept_runs(plan, 8).tolist() == [[2, 3], [1, 2], [5, 0], [0, 5]]
    assert [int(kept_runs(row[None], 8)[0, 1]) for row in plan] == [3, 2, 0, 5]
    assert kept_runs(torch.tensor([[0, 1, 2]]), 3).tolist() == [[3, 3]]
    assert kept_runs(torch.empty(1, 0, dtype=torch.long), 3).tolist() == [[0, 0]]


def test_a_policy_with_a_keep_of_its_own_never_claims_a_newest_run():
    class Reversed(StreamingLLM):
        def keep(self, layer, n):
            kept = super().keep(layer, n)
            return None if kept is None else kept.flip(-1)

    policy = Reversed(start_size=2, recent_size=4)
    policy.bind(2)
    for layer in range(2):
        policy.record(layer, 9)
    assert policy.keep(0, 9) is not None and policy.kept_runs(0) is None
    plain = StreamingLLM(start_size=2, recent_size=4)
    plain.bind(2)
    for layer in range(2):
        plain.record(layer, 9)
    plain.keep(0, 9)
    assert plain.kept_runs(0) == (2, 4) and plain.kept_runs(1) == (2, 4)


def test_streamingllm_positions_follow_from_the_count_held():
    """StreamingLLM's closed-form positions equal those the base class carries along each keep, over chunks of
    every size (a chunk larger than the budget included)."""
    class Carried(StreamingLLM):
        apply = CachePolicy.apply
        layer_positions = CachePolicy.layer_positions

    ours, carried = StreamingLLM(start_size=3, recent_size=9), Carried(start_size=3, recent_size=9)
    n = 0
    for chunk in [1, 2, 5, 1, 1, 17, 3, 1, 30, 1, 1, 2]:
        n += chunk
        keeps = [policy.compact(n, 3) for policy in (ours, carried)]
        assert (keeps[0] is None) == (keeps[1] is None)
        n = n if keeps[0] is None else keeps[0][0].shape[-1]
        assert torch.equal(ours.positions, carried.positions), chunk


@needs_cache_objects
def test_streamingllm_rotates_its_sinks_not_its_window():
    """One eviction per step: the window's stored keys keep their bits (the frame moves by one), the sinks are
    rotated, and the logits equal those of keys rotated from scratch at every step."""
    model = enable_position_shift(tiny_model("llama", "eager"))
    settings = dict(start_size=4, recent_size=20)
    every = make_cache("streamingllm", model, key_rotation="every_step", **settings)
    reference = stream(model, every, TOKENS)
    frame = make_cache("streamingllm", model, key_rotation="incremental", **settings)
    seen = {}

    def check(t, cache):
        key = cache._stored(1)[0]
        if t >= 30:  # full: one slot evicted per step, the window moves down one slot
            assert cache.placement.offsets[1] == t + 1 - 24
            assert torch.equal(key[..., 4:-1, :], seen["key"][..., 5:, :])  # not rotated again: same bits
            assert not torch.equal(key[..., :4, :], seen["key"][..., :4, :])  # the sinks were
        seen["key"] = key.clone()

    ours = stream(model, frame, TOKENS, check)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    rotation = next(m._lacache_rotation for m in model.modules() if hasattr(m, "_lacache_rotation"))
    for i in range(model.config.num_hidden_layers):  # what readers of the cache see: keys at their slots
        torch.testing.assert_close(frame._layer(i)[0], rotation.from_slot(every._layer(i)[0], 0), atol=1e-5, rtol=1e-5)


@needs_cache_objects
@pytest.mark.parametrize("method,settings", [("streamingllm", dict(start_size=4, recent_size=20)),
                                             ("lacache", dict(cache_size=24, span=2, overlap=0))])
def test_the_frame_is_folded_back_into_the_keys(monkeypatch, method, settings):
    """Past REBASE_AFTER positions a layer's keys are rotated back to their slots; the logits do not change."""
    monkeypatch.setattr(placement, "REBASE_AFTER", 7)
    model = enable_position_shift(tiny_model("llama", "eager"))
    reference = stream(model, make_cache(method, model, key_rotation="every_step", **settings), TOKENS)
    offsets = []
    cache = make_cache(method, model, key_rotation="incremental", **settings)
    ours = stream(model, cache, TOKENS, lambda t, c: offsets.append(c.placement.offsets[0]))
    moved = next(t for t, offset in enumerate(offsets) if offset)
    assert max(offsets) <= 7 and 0 in offsets[moved:]  # moved, then folded back
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
